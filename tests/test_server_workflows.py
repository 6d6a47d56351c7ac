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
