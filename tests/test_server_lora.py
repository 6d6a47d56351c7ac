"""VRAMWise LoRA inside a real ComfyUI server: listed from models/loras, chained, strength changes without a
reload, and the refusals (a LoRA for another model, a partial match) as the user sees them."""

from __future__ import annotations

import pytest

from api_prompts import i2v_prompt, successful_frame_bytes
from comfy_harness import execution_error
from conftest import LIGHTX2V_LORA, PARTIAL_LORA, WRONG_LORA

pytestmark = pytest.mark.server


def _with_loras(prompt: dict, *loras: tuple[str, float]) -> dict:
    """Chain LoRA nodes "30", "31", ... between the loader ("2") and the sampler and decoder."""
    source = ["2", 0]
    for i, (name, strength) in enumerate(loras):
        node = str(30 + i)
        prompt[node] = {"class_type": "VRAMWiseLoraLoader",
                        "inputs": {"model": source, "lora_name": name, "strength": strength, "strength_low_noise": 1.0}}
        source = [node, 0]
    prompt["3"]["inputs"]["model"] = source
    return prompt


def test_lora_node_lists_the_loras_folder_with_documented_inputs(comfy_server):
    info = comfy_server.object_info()["VRAMWiseLoraLoader"]
    required = info["input"]["required"]
    assert list(required) == ["model", "lora_name", "strength", "strength_low_noise"]
    listed = required["lora_name"][1]["options"]
    assert LIGHTX2V_LORA in listed and f"sub/{PARTIAL_LORA}" in listed
    assert all(required[n][1].get("tooltip") for n in required)
    assert info["output"] == ["VRAMWISE_MODEL"]
    sampler = comfy_server.object_info()["VRAMWiseSampler"]["input"]
    assert sampler["optional"]["scheduler"][1]["options"] == ["default", "flow_euler", "dpm++", "lcm"]


def test_strength_change_and_removal_reuse_the_loaded_model(comfy_server):
    kw = dict(frames=5, cfg=1.0, steps=2, seed=5)
    plain = successful_frame_bytes(comfy_server, comfy_server.run(i2v_prompt(**kw)))
    full_entry = comfy_server.run(_with_loras(i2v_prompt(**kw), (LIGHTX2V_LORA, 1.0)))
    full = successful_frame_bytes(comfy_server, full_entry)
    half_entry = comfy_server.run(_with_loras(i2v_prompt(**kw), (LIGHTX2V_LORA, 0.5)))
    half = successful_frame_bytes(comfy_server, half_entry)
    zero = successful_frame_bytes(comfy_server, comfy_server.run(_with_loras(i2v_prompt(**kw), (LIGHTX2V_LORA, 0.0))))
    removed = successful_frame_bytes(comfy_server, comfy_server.run(i2v_prompt(**kw)))
    assert full != plain and half != full
    assert zero == plain and removed == plain
    # The loader reported reusing its model on every run after the first (no reload from disk).
    for entry in (full_entry, half_entry):
        assert "(reused the loaded model)" in entry["outputs"]["2"]["text"][0]
    info = half_entry["outputs"]["3"]["text"][0]
    assert f"LoRA '{LIGHTX2V_LORA}'" in info and "x0.5" in info and "ignored" in info


def test_two_chained_loras_apply_together(comfy_server):
    kw = dict(frames=5, cfg=1.0, steps=2, seed=6)
    one = successful_frame_bytes(comfy_server, comfy_server.run(_with_loras(i2v_prompt(**kw), (LIGHTX2V_LORA, 1.0))))
    entry = comfy_server.run(_with_loras(i2v_prompt(**kw), (LIGHTX2V_LORA, 1.0), (f"sub/{PARTIAL_LORA}", 1.0)))
    two = successful_frame_bytes(comfy_server, entry)
    assert two != one
    info = entry["outputs"]["3"]["text"][0]
    assert LIGHTX2V_LORA in info and PARTIAL_LORA in info


def test_lora_for_another_model_fails_naming_the_file_and_the_server_stays_up(comfy_server):
    entry = comfy_server.run(_with_loras(i2v_prompt(frames=5, steps=1), (WRONG_LORA, 1.0)))
    err = execution_error(entry)
    assert err is not None and err.get("node_id") == "30"
    message = err.get("exception_message", "")
    assert WRONG_LORA in message and "0 of 40 keys matched" in message and "Fix:" in message
    ok = comfy_server.run(i2v_prompt(frames=5, steps=1))
    assert ok.get("status", {}).get("status_str") == "success", execution_error(ok)


def test_partial_lora_runs_and_info_counts_the_ignored_keys(comfy_server):
    entry = comfy_server.run(_with_loras(i2v_prompt(frames=5, steps=1, cfg=1.0), (f"sub/{PARTIAL_LORA}", 1.0)))
    successful_frame_bytes(comfy_server, entry)
    node_text = entry["outputs"]["30"]["text"][0]
    assert "24 of 26 keys applied" in node_text and "2 ignored" in node_text and "1 layers not in this model" in node_text


def test_lora_on_a_family_without_lora_support_is_refused(comfy_server):
    entry = comfy_server.run(_with_loras(i2v_prompt("tiny-i2vgenxl", frames=4, steps=1, width=64, height=64),
                                         (LIGHTX2V_LORA, 1.0)))
    err = execution_error(entry)
    assert err is not None and "LoRA is not supported for I2VGen-XL" in err.get("exception_message", "")


def test_flow_scheduler_choices_run(comfy_server):
    outs = {}
    for scheduler in ("default", "flow_euler", "dpm++", "lcm"):
        prompt = i2v_prompt(frames=5, steps=3, cfg=1.0, seed=9)
        prompt["3"]["inputs"]["scheduler"] = scheduler
        outs[scheduler] = successful_frame_bytes(comfy_server, comfy_server.run(prompt))
    assert len({b"".join(v) for v in outs.values()}) == 4


def test_lora_name_outside_the_listing_is_refused(comfy_server):
    messages = set()
    for name in ("/etc/passwd", f"../loras/{LIGHTX2V_LORA}", "../../../../etc/passwd"):
        err = execution_error(comfy_server.run(_with_loras(i2v_prompt(frames=5, steps=1), (name, 1.0))))
        assert err is not None and err["node_type"] == "VRAMWiseLoraLoader", name
        messages.add(err["exception_message"])
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("lora_name:") and "pick a file from the list" in message and "passwd" not in message
