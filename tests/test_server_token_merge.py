"""VRAMWise Token Merge inside a real ComfyUI server: registered, runs, ratio 0 and bypass give the plain video."""

from __future__ import annotations

import pytest
from PIL import Image, ImageSequence

from api_prompts import i2v_prompt, saved_files
from comfy_harness import execution_error

pytestmark = pytest.mark.server

MERGE_ID = "20"


def _with_token_merge(prompt: dict, **inputs) -> dict:
    """Splice a token-merge node between the loader ("2") and the sampler ("3")."""
    settings = dict(ratio=0.5, start_percent=0.0, end_percent=1.0, skip_first_blocks=0, skip_last_blocks=0,
                    window="spatial+temporal")
    settings.update(inputs)
    prompt[MERGE_ID] = {"class_type": "VRAMWiseTokenMerge", "inputs": {"model": ["2", 0], **settings}}
    prompt["3"]["inputs"]["model"] = [MERGE_ID, 0]
    return prompt


def _frames(server, entry) -> list[bytes]:
    status = entry.get("status", {})
    assert status.get("status_str") == "success", execution_error(entry) or status
    files = saved_files(entry)
    assert len(files) == 1, entry.get("outputs")
    path = server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    with Image.open(path) as im:
        return [frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(im)]


def test_token_merge_node_is_registered_with_documented_inputs(comfy_server):
    info = comfy_server.object_info()["VRAMWiseTokenMerge"]
    required = info["input"]["required"]
    for name in ("model", "ratio", "start_percent", "end_percent", "skip_first_blocks", "skip_last_blocks", "window"):
        assert name in required, name
        assert required[name][1].get("tooltip"), f"{name} has no tooltip"
    assert required["window"][1]["options"] == ["spatial", "spatial+temporal"]
    assert info["output"] == ["VRAMWISE_MODEL"]


def test_merged_run_succeeds_and_ratio_zero_or_bypass_gives_the_plain_video(comfy_server):
    kw = dict(frames=9, seed=11)
    plain = _frames(comfy_server, comfy_server.run(i2v_prompt(**kw)))
    entry = comfy_server.run(_with_token_merge(i2v_prompt(**kw)))
    merged = _frames(comfy_server, entry)
    assert len(merged) == 9
    assert "token merge: ratio 0.5" in entry["outputs"][MERGE_ID]["text"][0]
    assert "token_merge" in entry["outputs"]["3"]["text"][0]  # the sampler's info lists the patch
    assert merged != plain
    off = _frames(comfy_server, comfy_server.run(_with_token_merge(i2v_prompt(**kw), ratio=0.0)))
    assert off == plain
    again = _frames(comfy_server, comfy_server.run(i2v_prompt(**kw)))  # node removed: the cached model is unpatched
    assert again == plain


@pytest.mark.parametrize("model", ["tiny-easyanimate-v51-inp", "tiny-i2vgenxl"])
def test_token_merge_runs_on_the_other_families(comfy_server, model):
    entry = comfy_server.run(_with_token_merge(i2v_prompt(model, frames=5)))
    assert len(_frames(comfy_server, entry)) == 5
