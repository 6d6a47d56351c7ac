"""A template runs exactly as shipped on a server whose input folder the pack has to fill, and node search finds the pack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import comfy_harness
from comfy_harness import execution_error
from conftest import START_IMAGE
from workflow_api import check_workflow, ui_to_api

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
PICTURES = REPO / "assets" / "input"


@pytest.fixture(scope="module")
def fresh_server(tiny_models_root, tmp_path_factory):
    """A new ComfyUI base folder with nothing in input/ (as on a fresh install) and the demo's tiny model."""
    base = tmp_path_factory.mktemp("fresh-comfy")
    server = comfy_harness.ComfyServer(base, extra_args=["--cache-none"])
    server.prepare()
    (server.models_dir / "diffusers" / "tiny-wan21-i2v").symlink_to(tiny_models_root / "tiny-wan21-i2v", target_is_directory=True)
    assert not any(server.input_dir.iterdir())
    server.start()
    yield server
    server.stop()


def test_pack_start_puts_the_template_pictures_where_load_image_lists_them(fresh_server):
    for picture in PICTURES.glob("*.png"):
        assert (fresh_server.input_dir / picture.name).read_bytes() == picture.read_bytes()
    options = fresh_server.object_info()["LoadImage"]["input"]["required"]["image"][0]
    assert {"vramwise_start.png", "vramwise_end.png"} <= set(options)


def test_the_demo_template_runs_unchanged_on_a_fresh_install(fresh_server):
    workflow = json.loads((REPO / "workflows" / "vramwise_tiny_demo.json").read_text())
    info = fresh_server.object_info()
    assert check_workflow(workflow, info) == []
    entry = fresh_server.run(ui_to_api(workflow, info), timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    writer_id = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "VRAMWiseVideoWriter")
    writer = entry["outputs"][writer_id]
    assert "17 frames 128x96 @ 16 fps" in writer["text"][0]


def test_a_users_picture_of_the_same_name_is_kept(comfy_server):
    # The shared server's input folder got the test pictures before the pack started: they must survive.
    assert (comfy_server.input_dir / START_IMAGE).read_bytes() != (PICTURES / START_IMAGE).read_bytes()


@pytest.mark.parametrize("term", ["wan", "i2v", "image to video", "easyanimate"])
def test_node_search_finds_the_pack_by(comfy_server, term):
    # The frontend's node search indexes each node's name and display_name (its Fuse keys in frontend 1.32).
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("VRAMWise")}
    hits = [k for k, v in ours.items() if term in f"{k} {v['display_name']}".lower()]
    assert "VRAMWiseSampler" in hits or "VRAMWiseModelLoader" in hits, {k: v["display_name"] for k, v in ours.items()}
    assert all(v["description"] for v in ours.values())
