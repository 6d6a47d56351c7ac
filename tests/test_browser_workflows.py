"""The shipped workflows in the real ComfyUI frontend (headless Chromium), the way users use them.

One browser session (tests/browser/drive.mjs) per module does everything in order and the tests check their
part of its report: load every workflow into the canvas, open the pack's templates, run the tiny demo with the
Run button's call, drop its output files back onto the canvas, cancel a long run and run again.
Needs Chromium and playwright-core: `bash scripts/browser_setup.sh` (scripts/test.sh runs it).
Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from workflow_api import ui_to_api

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
DEMO = REPO / "workflows" / "vramwise_tiny_demo.json"
DRIVER = REPO / "tests" / "browser" / "drive.mjs"
CHROMIUM = Path(os.environ.get("VRAMWISE_CHROMIUM", "/usr/bin/chromium"))
PLAYWRIGHT = Path(os.environ.get("VRAMWISE_BROWSER_CACHE", REPO / ".cache" / "browser")) / "node_modules" / "playwright-core"
SCREENSHOTS = REPO / "artifacts" / "screenshots"
PACK = "comfyui-vramwise"
WRITER = "VRAMWiseVideoWriter"
SETUP_HINT = "run `bash scripts/browser_setup.sh` (installs chromium and playwright-core)"
LONG_STEPS = 200
OTHER_FORMATS = {"image/webp": "webp", "image/png-frames": "png_frames"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _require_browser() -> None:
    missing = []
    if shutil.which("node") is None:
        missing.append("node (Node.js >= 18) is not on PATH")
    if not CHROMIUM.exists():
        missing.append(f"no Chromium at {CHROMIUM}")
    if not (PLAYWRIGHT / "package.json").is_file():
        missing.append(f"no playwright-core under {PLAYWRIGHT.parent}")
    if missing:
        pytest.fail("browser tests cannot run: " + "; ".join(missing) + f": {SETUP_HINT}", pytrace=False)


def _output_node(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    outs = [n for n in workflow["nodes"] if object_info.get(n["type"], {}).get("output_node")]
    assert len(outs) == 1, f"the demo should have one output node, has {[n['type'] for n in outs]}"
    return outs[0]


def _job(server, object_info: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    demo = _load(DEMO)
    sampler = next(n for n in demo["nodes"] if n["type"] == "VRAMWiseSampler")
    actions: list[dict[str, Any]] = [
        {"type": "load_check", "id": "load", "workflows": [{"name": p.stem, "json": _load(p)} for p in WORKFLOWS]},
        {"type": "templates", "id": "templates", "pack": PACK},
        {"type": "run", "id": "demo", "workflow": demo, "screenshot": "vramwise_tiny_demo_finished.png"},
        {"type": "drop_outputs", "id": "drop_demo", "from": "demo"},
        {"type": "cancel", "id": "cancel", "workflow": demo, "set_widgets": {str(sampler["id"]): {"steps": LONG_STEPS}}},
    ]
    # The run after Cancel; when the demo does not write through the pack's video writer but the writer is
    # registered, this run adds one (MP4) so its file is dropped back too.
    after: dict[str, Any] = {"type": "run", "id": "after_cancel", "workflow": demo,
                             "screenshot": "vramwise_tiny_demo_after_cancel.png"}
    add_writer = WRITER in object_info and _output_node(demo, object_info)["type"] != WRITER
    if add_writer:
        decode = next(n for n in demo["nodes"] if n["type"] == "VRAMWiseVAEDecode")
        after["add_nodes"] = [{"type": WRITER, "inputs": {"images": [decode["id"], 0]},
                               "widgets": {"format": "video/h264-mp4", "filename_prefix": "vramwise/browser_mp4"}}]
    actions += [after, {"type": "drop_outputs", "id": "drop_after_cancel", "from": "after_cancel"}]
    # The same run written as animated WebP and as PNG frames: those files must carry the graph back too.
    writer = _output_node(demo, object_info)
    if writer["type"] == WRITER:
        for fmt, run_id in OTHER_FORMATS.items():
            actions += [
                {"type": "run", "id": run_id, "workflow": demo, "set_widgets": {str(writer["id"]): {"format": fmt}}},
                {"type": "drop_outputs", "id": f"drop_{run_id}", "from": run_id},
            ]
    job = {"url": server.url, "screenshot_dir": str(SCREENSHOTS), "timeout_ms": 240000, "actions": actions}
    return job, add_writer


@pytest.fixture(scope="session")
def browser_installed() -> None:
    """Fails (never skips) before the server starts when the browser pieces are missing."""
    _require_browser()


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict[str, Any]:
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def browser(browser_installed, comfy_server, object_info) -> dict[str, Any]:
    """The driver's report: {"results": {action id: result}, "console_errors": [...], ...}."""
    job, added_writer = _job(comfy_server, object_info)
    proc = subprocess.run(["node", str(DRIVER), "-"], input=json.dumps(job), capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(f"driver gave no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    report = json.loads(lines[-1])
    if "fatal" in report:
        pytest.fail(f"browser driver failed: {report['fatal']}\n{proc.stderr[-2000:]}", pytrace=False)
    report["results"] = {r["id"]: r for r in report["results"]}
    report["added_writer"] = added_writer
    return report


def _result(browser: dict[str, Any], action_id: str) -> dict[str, Any]:
    r = browser["results"][action_id]
    assert r["ok"], f"browser action '{action_id}' failed:\n{r.get('error')}"
    return r


def _graph_summary(nodes: list[dict[str, Any]]) -> dict[int, tuple[str, Any]]:
    return {n["id"]: (n["type"], n.get("widgets_values")) for n in nodes}


# -- 1. every workflow loads cleanly and the frontend's prompt matches our converter ---------------------------
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_canvas(browser, object_info, path):
    loaded = {w["name"]: w for w in _result(browser, "load")["workflows"]}[path.stem]
    workflow = _load(path)
    assert loaded["missing_types"] == [], "node types the frontend does not know"
    assert all(n["has_live_node"] for n in loaded["state"]["nodes"])

    in_file = _graph_summary(workflow["nodes"])
    # A file saved before widgets were appended gets the new ones at their defaults after its own values:
    # compare the values the file has, which must land unchanged and in order.
    in_page = {}
    for n in loaded["state"]["nodes"]:
        saved = in_file.get(n["id"], (None, None))[1]
        values = n["widgets_values"]
        if isinstance(saved, list) and isinstance(values, list):
            values = values[: len(saved)]
        in_page[n["id"]] = (n["type"], values)
    assert in_page == in_file, "widget values changed on load (reordered, renamed or rejected widgets)"

    bad_combos = [(n["id"], c["name"], c["value"]) for n in loaded["state"]["nodes"] for c in n["combos"]
                  if c["options"] is not None and c["value"] not in c["options"]]
    assert bad_combos == [], "combo values the widget does not offer"
    assert sorted(map(tuple, loaded["state"]["links"])) == sorted(tuple(link[:5]) for link in workflow["links"])

    ours = ui_to_api(workflow, object_info)
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in loaded["prompt"].items()}
    assert theirs == ours, "app.graphToPrompt() and scripts/workflow_api.ui_to_api disagree"


# -- 2. the templates dialog lists and opens the pack's workflows -----------------------------------------------
def test_pack_templates_open_in_the_frontend(browser):
    r = _result(browser, "templates")
    assert sorted(r["names"]) == sorted(p.stem for p in WORKFLOWS), r["listing"]
    for entry in r["opened"]:
        assert entry["status"] == 200, entry
        assert entry["node_count"] == entry["file_node_count"] > 0, entry
        assert entry["missing_types"] == [], entry


# -- 3. the demo runs from the UI, its output node shows the result, screenshot kept ----------------------------
def test_demo_runs_from_the_ui_and_shows_its_output(browser, object_info):
    r = _result(browser, "demo")
    assert r["end"] == "execution_success", r["end_detail"]
    assert r["preview_error"] is None, r["preview_error"]
    out_id = str(_output_node(_load(DEMO), object_info)["id"])
    preview = r["previews"][out_id]
    assert preview["output"] and preview["output"].get("images"), preview
    shown = [i for i in preview["imgs"] if i["complete"] and i["width"] > 0] + \
            [v for v in preview["video"] if v["ready"] >= 2 and v["width"] > 0]
    assert shown, f"the output node shows no loaded preview: {preview}"
    assert Path(r["screenshot"]).is_file() and Path(r["screenshot"]).stat().st_size > 10_000


# -- 4. the produced files dropped back onto the canvas restore the graph ---------------------------------------
@pytest.mark.parametrize("run_id", ["drop_demo", "drop_after_cancel", "drop_webp", "drop_png_frames"])
def test_output_file_dropped_on_the_canvas_restores_the_graph(browser, object_info, run_id):
    r = _result(browser, run_id)
    assert r["drops"], "the run produced no file to drop"
    original = r["original"]
    for drop in r["drops"]:
        restored = drop["restored"]
        assert drop["missing_types"] == [], drop["file"]
        assert _graph_summary(restored["nodes"]) == _graph_summary(original["nodes"]), drop["file"]
        assert sorted(map(tuple, restored["links"])) == sorted(map(tuple, original["links"])), drop["file"]
    suffixes = {"drop_webp": ".webp", "drop_png_frames": ".png"}
    if run_id in suffixes:
        assert all(d["file"]["filename"].endswith(suffixes[run_id]) for d in r["drops"]), r["drops"]
    if run_id == "drop_after_cancel" and (browser["added_writer"] or WRITER in object_info):
        assert any(d["file"]["filename"].endswith(".mp4") for d in r["drops"]), \
            f"{WRITER} is registered but no MP4 was dropped: {[d['file'] for d in r['drops']]}"


# -- 5. Cancel during a long run stops it; the next run succeeds ------------------------------------------------
def test_cancel_from_the_ui_then_run_again(browser):
    r = _result(browser, "cancel")
    assert r["end"] == "execution_interrupted", r
    assert r["progress_max"] == LONG_STEPS, r
    assert r["max_progress"] < LONG_STEPS, r
    assert r["seconds_to_stop"] < 30, r
    again = _result(browser, "after_cancel")
    assert again["end"] == "execution_success", again["end_detail"]
