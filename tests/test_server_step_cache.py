"""VRAMWise Step Cache inside a real ComfyUI server: registered, runs and reports, threshold 0 gives the plain
video, and a refused model fails the prompt with the fix while the next prompt works."""

from __future__ import annotations

import pytest

from api_prompts import i2v_prompt, successful_frame_bytes
from comfy_harness import execution_error

pytestmark = pytest.mark.server

CACHE_ID = "21"


def _with_step_cache(prompt: dict, **inputs) -> dict:
    """Splice a step-cache node between the loader ("2") and the sampler ("3")."""
    settings = dict(method="fixed", threshold=-1.0, start_percent=0.0, end_percent=1.0, max_consecutive_skips=1)
    settings.update(inputs)
    prompt[CACHE_ID] = {"class_type": "VRAMWiseStepCache", "inputs": {"model": ["2", 0], **settings}}
    prompt["3"]["inputs"]["model"] = [CACHE_ID, 0]
    return prompt


def test_step_cache_node_is_registered_with_documented_inputs(comfy_server):
    info = comfy_server.object_info()["VRAMWiseStepCache"]
    assert info["display_name"] == "VRAMWise Step Cache"
    required = info["input"]["required"]
    assert list(required) == ["model", "method", "threshold", "start_percent", "end_percent", "max_consecutive_skips"]
    for name in required:
        assert required[name][1].get("tooltip"), f"{name} has no tooltip"
    assert required["method"][1]["options"] == ["easycache", "teacache", "magcache", "fixed"]
    assert info["output"] == ["VRAMWISE_MODEL"]


def test_cached_run_reports_steps_and_threshold_zero_gives_the_plain_video(comfy_server):
    kw = dict(steps=4, seed=5)
    plain = successful_frame_bytes(comfy_server, comfy_server.run(i2v_prompt(**kw)))
    entry = comfy_server.run(_with_step_cache(i2v_prompt(**kw)))
    cached = successful_frame_bytes(comfy_server, entry)
    info = entry["outputs"]["3"]["text"][0]
    assert "transformer: 2 computed, 2 skipped" in info, info
    assert cached != plain
    off = successful_frame_bytes(comfy_server, comfy_server.run(_with_step_cache(i2v_prompt(**kw), threshold=0.0)))
    assert off == plain


def test_a_refused_model_names_the_fix_and_the_next_prompt_runs(comfy_server):
    entry = comfy_server.run(_with_step_cache(i2v_prompt("tiny-i2vgenxl", frames=4, steps=2)))
    error = execution_error(entry)
    assert error is not None and "remove the Step Cache node" in error.get("exception_message", ""), error
    successful_frame_bytes(comfy_server, comfy_server.run(_with_step_cache(i2v_prompt(steps=3), method="easycache")))
