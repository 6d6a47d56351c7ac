"""Every shipped workflow loads against the live node schemas and runs (real-model graphs on tiny stand-ins)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_harness import execution_error
from workflow_api import check_workflow, ui_to_api, widget_names

pytestmark = pytest.mark.server

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
# Small enough for a CPU; everything else in the graph is exactly as shipped.
CPU_SIZE = {"width": 64, "height": 64, "num_frames": 5, "steps": 2}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_workflows_to_check():
    names = {p.stem for p in WORKFLOWS}
    assert {"vramwise_tiny_demo", "wan21_i2v_480p", "wan22_i2v_a14b"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_fits_the_live_schemas(comfy_server, path):
    problems = check_workflow(_load(path), comfy_server.object_info())
    assert problems == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_to_success(comfy_server, path):
    prompt = ui_to_api(_load(path), comfy_server.object_info())
    for node in prompt.values():
        if node["class_type"] == "VRAMWiseSampler" and path.stem != "vramwise_tiny_demo":
            node["inputs"].update(CPU_SIZE)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def test_pack_templates_are_listed_for_the_templates_dialog(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    listed = set(templates.get("comfyui-vramwise", []))
    assert {p.stem for p in WORKFLOWS} <= listed
    first = comfy_server.get(f"/api/workflow_templates/comfyui-vramwise/{WORKFLOWS[0].name}")
    assert first.ok and first.json()["nodes"]


def test_sampler_widget_order_is_the_saved_contract(comfy_server):
    # Saved workflows store widget values by position: this order may only ever grow at the end.
    names = widget_names(comfy_server.object_info()["VRAMWiseSampler"])
    assert names[:10] == ["prompt", "negative_prompt", "width", "height", "num_frames", "steps", "cfg", "seed", "shift", "resize_mode"]
    loader = widget_names(comfy_server.object_info()["VRAMWiseModelLoader"])
    assert loader[:4] == ["model", "offload_mode", "weight_dtype", "text_encoder_on_cpu"]
    decode = widget_names(comfy_server.object_info()["VRAMWiseVAEDecode"])
    assert decode[:3] == ["tiling", "tile_size", "tile_overlap"]


def test_a_workflow_saved_before_widgets_were_appended_still_loads_and_runs(comfy_server):
    workflow = _load(next(p for p in WORKFLOWS if p.stem == "vramwise_tiny_demo"))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "VRAMWiseSampler")
    # The sampler's widgets as first released: prompt .. resize_mode, with the seed's control value.
    sampler["widgets_values"] = sampler["widgets_values"][:11]
    info = comfy_server.object_info()
    assert check_workflow(workflow, info) == []
    prompt = ui_to_api(workflow, info)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def _writer_text(entry: dict) -> str:
    writer = next(out for out in entry["outputs"].values() if "videos" in out or "images" in out)
    return writer["text"][0]


def _run_cpu_sized(comfy_server, workflow: dict) -> dict:
    prompt = ui_to_api(workflow, comfy_server.object_info())
    for node in prompt.values():
        if node["class_type"] == "VRAMWiseSampler":
            node["inputs"].update(CPU_SIZE)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry


def test_decoder_fps_is_float_and_linked_to_the_writer_in_every_shipped_workflow(comfy_server):
    info = comfy_server.object_info()
    assert info["VRAMWiseVAEDecode"]["output"] == ["IMAGE", "FLOAT"]
    assert info["VRAMWiseVideoWriter"]["input"]["required"]["fps"][0] == "FLOAT"
    for path in WORKFLOWS:
        workflow = _load(path)
        nodes = {n["id"]: n for n in workflow["nodes"]}
        links = {link[0]: link for link in workflow["links"]}
        writer = next(n for n in workflow["nodes"] if n["type"] == "VRAMWiseVideoWriter")
        fps = next(i for i in writer["inputs"] if i["name"] == "fps")
        source = links[fps["link"]]
        assert (nodes[source[1]]["type"], source[2], source[5]) == ("VRAMWiseVAEDecode", 1, "FLOAT"), path.name


def test_ti2v_5b_template_writes_the_models_24_fps(comfy_server):
    """The published TI2V-5B folder (WanPipeline + expand_timesteps) runs, and its rate reaches the file."""
    entry = _run_cpu_sized(comfy_server, _load(next(p for p in WORKFLOWS if p.stem == "wan22_ti2v_5b")))
    assert "@ 24 fps" in _writer_text(entry)
    assert "Wan2.2 TI2V 5B" in json.dumps(entry["outputs"])


def test_a_workflow_saved_when_decode_fps_was_int_still_loads_and_runs(comfy_server):
    # As saved by the pack before fps became FLOAT: the decoder's output and its link to the writer typed INT.
    workflow = _load(next(p for p in WORKFLOWS if p.stem == "easyanimate_v51_i2v"))
    decode = next(n for n in workflow["nodes"] if n["type"] == "VRAMWiseVAEDecode")
    decode["outputs"][1]["type"] = "INT"
    for link in workflow["links"]:
        if link[1] == decode["id"] and link[2] == 1:
            link[5] = "INT"
    for node in workflow["nodes"]:
        for inp in node.get("inputs", []):
            if inp["name"] == "fps":
                inp["type"] = "INT"
    info = comfy_server.object_info()
    assert check_workflow(workflow, info) == []
    entry = _run_cpu_sized(comfy_server, workflow)
    assert "@ 8 fps" in _writer_text(entry)  # EasyAnimate's own rate, through the link


def test_a_workflow_saved_with_the_int_fps_unlinked_still_runs_at_its_widget_rate(comfy_server):
    # The shipped files before the link existed: fps as a widget value (16), decoder's output INT and unused.
    workflow = _load(next(p for p in WORKFLOWS if p.stem == "easyanimate_v51_i2v"))
    decode = next(n for n in workflow["nodes"] if n["type"] == "VRAMWiseVAEDecode")
    writer = next(n for n in workflow["nodes"] if n["type"] == "VRAMWiseVideoWriter")
    fps_link = next(i for i in writer["inputs"] if i["name"] == "fps")["link"]
    writer["inputs"] = [i for i in writer["inputs"] if i["name"] != "fps"]
    workflow["links"] = [link for link in workflow["links"] if link[0] != fps_link]
    decode["outputs"][1].update(type="INT", links=[])
    writer["widgets_values"][0] = 16.0
    assert check_workflow(workflow, comfy_server.object_info()) == []
    assert "@ 16 fps" in _writer_text(_run_cpu_sized(comfy_server, workflow))


def test_extend_template_continues_segment_one_from_its_last_frame(comfy_server):
    """Two 5-frame segments joined without repeating the shared frame: 5 + 4 frames in one file."""
    workflow = _load(next(p for p in WORKFLOWS if p.stem == "wan21_i2v_extend"))
    entry = _run_cpu_sized(comfy_server, workflow)
    frames = CPU_SIZE["num_frames"]
    assert f"{2 * frames - 1} frames 64x64" in _writer_text(entry)
    # Segment 2's sampler got exactly one image, the right size: no batch note, nothing to crop.
    sampler_2 = next(str(n["id"]) for n in workflow["nodes"] if n.get("title") == "Segment 2")
    assert "Image From Batch" not in entry["outputs"][sampler_2]["text"][0]
