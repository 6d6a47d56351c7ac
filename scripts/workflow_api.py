"""Read UI-format workflows (what users drag onto the canvas) against live node schemas.

``ui_to_api`` turns a workflow into the API prompt the frontend would queue; ``check_workflow`` lists every
way a workflow no longer fits the schemas (missing node types, widget values out of range or not offered).
Widget values are positional in UI files, so a silently reordered or renamed widget shows up here as values
landing in the wrong inputs.
"""

from __future__ import annotations

from typing import Any

SOCKET_ONLY = object()


def _input_specs(info: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, type, options) of every input in the order the frontend creates widgets."""
    specs = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        inputs = info.get("input", {}).get(section, {}) or {}
        names = order.get(section) or list(inputs)
        for name in names:
            spec = inputs[name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, opts))
    return specs


def _is_widget(kind: Any, opts: dict[str, Any]) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _combo_options(kind: Any, opts: dict[str, Any]) -> list[Any] | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options", []))
    return None


def _has_control_widget(kind: Any, opts: dict[str, Any]) -> bool:
    # The frontend adds a companion widget right after these ("control after generate" for seeds, the upload
    # button for file pickers) and saves its value too.
    if kind in ("INT", "FLOAT") and opts.get("control_after_generate"):
        return True
    return any(opts.get(k) for k in ("image_upload", "video_upload", "animated_image_upload", "audio_upload"))


def widget_names(info: dict[str, Any]) -> list[str]:
    return [name for name, kind, opts in _input_specs(info) if _is_widget(kind, opts)]


def _widget_values(node: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return dict(values)
    out: dict[str, Any] = {}
    i = 0
    for name, kind, opts in _input_specs(info):
        if not _is_widget(kind, opts):
            continue
        if i >= len(values):
            break
        out[name] = values[i]
        i += 2 if _has_control_widget(kind, opts) else 1
    return out


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API-format prompt for a UI-format workflow (muted and bypassed nodes left out)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        node_type = node["type"]
        if node_type not in object_info:
            raise KeyError(f"node {node['id']}: type '{node_type}' is not registered")
        info = object_info[node_type]
        inputs = _widget_values(node, info)
        for name, kind, opts in _input_specs(info):
            # Like the frontend: widgets appended after the file was saved start at their defaults.
            if name not in inputs and _is_widget(kind, opts) and "default" in opts:
                inputs[name] = opts["default"]
        for inp in node.get("inputs", []) or []:
            link_id = inp.get("link")
            if link_id is not None:
                link = links[link_id]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node_type, "inputs": inputs}
    return prompt


def check_workflow(workflow: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Every problem a user would see loading ``workflow``: empty when it fits the live schemas."""
    problems: list[str] = []
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for node in workflow.get("nodes", []):
        where = f"node {node['id']} ({node['type']})"
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: node type is not registered")
            continue
        specs = {name: (kind, opts) for name, kind, opts in _input_specs(info)}
        values = node.get("widgets_values") or []
        expected = sum(
            (2 if _has_control_widget(k, o) else 1) for _, k, o in _input_specs(info) if _is_widget(k, o)
        )
        # Fewer values is an older file saved before widgets were appended: the frontend fills in defaults.
        # More values means widgets were removed or reordered, which breaks saved workflows.
        if isinstance(values, list) and len(values) > expected:
            problems.append(f"{where}: {len(values)} widget values saved, the node has only {expected}")
        for name, value in _widget_values(node, info).items():
            kind, opts = specs[name]
            options = _combo_options(kind, opts)
            if options is not None:
                if value not in options:
                    problems.append(f"{where}: {name}={value!r} is not one of {options[:8]}")
                continue
            if kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"{where}: {name}={value!r} is not a number")
                    continue
                if kind == "INT" and not float(value).is_integer():
                    problems.append(f"{where}: {name}={value!r} is not an integer")
                lo, hi = opts.get("min"), opts.get("max")
                if lo is not None and value < lo or hi is not None and value > hi:
                    problems.append(f"{where}: {name}={value!r} is outside {lo}..{hi}")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not a boolean")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name}={value!r} is not text")
        for inp in node.get("inputs", []) or []:
            link_id = inp.get("link")
            if link_id is None:
                if inp["name"] in specs and not specs[inp["name"]][1].get("optional", False):
                    required = inp["name"] in (info.get("input", {}).get("required") or {})
                    if required and not _is_widget(*specs[inp["name"]]):
                        problems.append(f"{where}: required input '{inp['name']}' is not connected")
                continue
            link = links.get(link_id)
            if link is None:
                problems.append(f"{where}: input '{inp['name']}' points at missing link {link_id}")
                continue
            source = nodes.get(link[1])
            src_info = object_info.get(source["type"]) if source else None
            if src_info is None:
                continue
            out_types = src_info.get("output", [])
            if link[2] >= len(out_types):
                problems.append(f"{where}: input '{inp['name']}' comes from missing output {link[2]} of node {link[1]}")
                continue
            want = specs.get(inp["name"], (None, {}))[0]
            have = out_types[link[2]]
            if want is not None and not isinstance(want, list) and want != "*" and have != "*" and want != have:
                problems.append(f"{where}: input '{inp['name']}' wants {want}, gets {have} from node {link[1]}")
        for name in (info.get("input", {}).get("required") or {}):
            kind, opts = specs[name]
            connected = any(i["name"] == name and i.get("link") is not None for i in node.get("inputs", []) or [])
            if not _is_widget(kind, opts) and not connected:
                problems.append(f"{where}: required input '{name}' is not connected")
    return sorted(set(problems))
