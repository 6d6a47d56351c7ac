"""prompt/workflow survive in every format, read back by readers that are not ours where possible."""

from __future__ import annotations

import json
import os

import av
import pytest
import torch
from PIL import Image

import vramwise.video as vv
from vramwise.video.metadata import read_gif_comments

AVAILABLE = vv.available_formats()
PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 42, "text": 'a cat, "quoted"'}}})
WORKFLOW = json.dumps({"nodes": [{"id": 1, "type": "VRAMWiseVideoWriter", "widgets": ["x" * 700]}], "links": []})
META = {"prompt": PROMPT, "workflow": WORKFLOW}


def clip(frames: int = 4) -> torch.Tensor:
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1)
    return (ramp * torch.linspace(0.2, 1, frames).view(frames, 1, 1, 1)).expand(frames, 24, 32, 3).contiguous()


def write(format_id: str, tmp_path, metadata=META, frames: int = 4) -> str:
    path = tmp_path / f"out{vv.get_format(format_id).extension}"
    return vv.encode_video(clip(frames), path, format_id, 16, metadata=metadata).path


@pytest.mark.parametrize("format_id", [f for f in AVAILABLE if f.endswith(("-mp4", "-mov"))])
def test_mp4_mov_tags(format_id, tmp_path):
    with av.open(write(format_id, tmp_path)) as container:
        assert container.metadata["prompt"] == PROMPT
        assert container.metadata["workflow"] == WORKFLOW


@pytest.mark.parametrize("format_id", [f for f in AVAILABLE if f.endswith("-webm")])
def test_webm_tags(format_id, tmp_path):
    with av.open(write(format_id, tmp_path)) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}  # Matroska stores names upper-cased
    assert tags["prompt"] == PROMPT and tags["workflow"] == WORKFLOW


def test_png_text_chunks_in_first_file_only(tmp_path):
    folder = write("image/png-frames", tmp_path)
    names = sorted(os.listdir(folder))
    with Image.open(os.path.join(folder, names[0])) as im:
        assert im.text == META
    with Image.open(os.path.join(folder, names[1])) as im:
        assert im.text == {}


def test_png_non_latin1_goes_to_itxt(tmp_path):
    meta = {"prompt": json.dumps({"text": "猫"}, ensure_ascii=False)}
    folder = write("image/png-frames", tmp_path, meta)
    with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as im:
        assert im.text["prompt"] == meta["prompt"]


@pytest.mark.parametrize("frames", [4, 1], ids=["animated", "single-frame"])
def test_webp_exif_like_comfyui(frames, tmp_path):
    path = write("image/webp", tmp_path, frames=frames)
    with Image.open(path) as im:
        exif = im.getexif()
        assert im.n_frames == frames
    assert exif[0x0110] == "prompt:" + PROMPT
    assert exif[0x010F] == "workflow:" + WORKFLOW
    assert vv.read_metadata(path) == META


def test_gif_comments(tmp_path):
    path = write("image/gif", tmp_path)
    assert read_gif_comments(path) == META
    with Image.open(path) as im:  # still a valid GIF for other readers
        assert im.n_frames == 4
        assert im.info.get("comment", b"").startswith(b"prompt:")


@pytest.mark.parametrize("format_id", AVAILABLE)
def test_read_metadata_round_trip(format_id, tmp_path):
    assert {k: v for k, v in vv.read_metadata(write(format_id, tmp_path)).items() if k in META} == META


@pytest.mark.parametrize("format_id", AVAILABLE)
def test_none_writes_no_tags(format_id, tmp_path):
    tags = vv.read_metadata(write(format_id, tmp_path, metadata=None))
    assert "prompt" not in tags and "workflow" not in tags


def test_bad_metadata_key(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        write("image/png-frames", tmp_path, {"a:b": "x"})
