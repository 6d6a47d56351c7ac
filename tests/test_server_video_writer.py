"""VRAMWiseVideoWriter inside the real server: files, history ui, metadata, traversal refusal, cancel cleanup."""

from __future__ import annotations

import json

import pytest

from api_prompts import i2v_prompt, writer_inputs
from comfy_harness import execution_error
from conftest import START_IMAGE
from vramwise.video import probe, read_metadata

pytestmark = pytest.mark.server


def _image_clip_prompt(prefix: str, frames: int, size: int = 64, **writer: object) -> dict:
    """LoadImage -> upscale -> repeat into a clip -> writer (core image nodes feeding our writer)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": START_IMAGE}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": size, "height": size, "crop": "disabled"}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": frames}},
        "5": {"class_type": "VRAMWiseVideoWriter", "inputs": writer_inputs(["3", 0], prefix, **writer)},
    }


def _written(server, entry, node="5"):
    out = entry["outputs"][node]
    item = out["images"][0]
    base = server.output_dir if item["type"] == "output" else server.base / "temp"
    return base / item["subfolder"] / item["filename"], out


def test_sampler_output_is_written_as_mp4_with_the_graph_embedded(comfy_server):
    prompt = i2v_prompt(save="mp4", frames=9, width=64, height=48, prefix="vw/clip")
    workflow = {"nodes": [{"id": 5, "type": "VRAMWiseVideoWriter"}], "links": []}
    entry = comfy_server.run(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    path, out = _written(comfy_server, entry)
    assert path.parent == comfy_server.output_dir / "vw" and path.suffix == ".mp4"
    assert out["animated"] == [True]
    info = probe(path)
    assert info.frame_count == 9 and (info.width, info.height) == (64, 48) and info.fps == 16
    meta = read_metadata(path)
    assert json.loads(meta["prompt"]) == prompt
    assert json.loads(meta["workflow"]) == workflow


def test_core_image_nodes_chain_into_the_writer_and_gif_webp_work(comfy_server):
    for fmt, ext in (("image/gif", ".gif"), ("image/webp", ".webp")):
        entry = comfy_server.run(_image_clip_prompt(f"chain_{ext[1:]}", 6, format=fmt))
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        path, _ = _written(comfy_server, entry)
        assert path.suffix == ext and path.exists()


def test_preview_only_goes_to_the_temp_folder(comfy_server):
    entry = comfy_server.run(_image_clip_prompt("preview_only", 4, save_output=False))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    path, out = _written(comfy_server, entry)
    assert out["images"][0]["type"] == "temp" and path.exists()


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs"])
def test_prefix_outside_the_output_folder_is_refused(comfy_server, prefix):
    error = execution_error(comfy_server.run(_image_clip_prompt(prefix, 2)))
    assert error is not None and "filename_prefix" in error["exception_message"]
    assert not (comfy_server.output_dir.parent / "escape_00001_.mp4").exists()
    assert comfy_server.alive()


def test_existing_files_are_never_overwritten(comfy_server):
    names = set()
    for _ in range(2):
        entry = comfy_server.run(_image_clip_prompt("same/name", 2))
        names.add(_written(comfy_server, entry)[0].name)
    assert len(names) == 2


def test_cancel_while_encoding_removes_the_partial_file(comfy_server):
    prefix = "cancelled/clip"
    prompt_id = comfy_server.queue(_image_clip_prompt(prefix, 600, size=512, pix_fmt="yuv444p", crf=0))
    deadline_event = comfy_server.wait_for_event
    deadline_event(prompt_id, "progress", timeout=120)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    folder = comfy_server.output_dir / "cancelled"
    leftovers = list(folder.iterdir()) if folder.exists() else []
    assert leftovers == []


def test_a_pixel_format_the_encoder_lacks_names_the_valid_ones(comfy_server):
    from vramwise.video import pix_fmts_for

    valid = pix_fmts_for("video/vp9-webm")
    assert "rgb48" not in valid
    error = execution_error(comfy_server.run(_image_clip_prompt("bad_pix", 2, format="video/vp9-webm", pix_fmt="rgb48")))
    assert error is not None and "pix_fmt" in error["exception_message"]
    assert all(v in error["exception_message"] for v in valid)


def test_png_frames_ignore_the_default_yuv_choice_and_write_a_sequence(comfy_server):
    entry = comfy_server.run(_image_clip_prompt("frames/seq", 3, format="image/png-frames"))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    path, _ = _written(comfy_server, entry)
    assert path.suffix == ".png" and len(list(path.parent.glob("*.png"))) == 3
