"""The Wan path inside a real ComfyUI server: registration, runs, progress, Cancel and bad input."""

from __future__ import annotations

import time

import pytest
from api_prompts import assert_success as _success
from api_prompts import i2v_prompt
from api_prompts import saved_frames as _frames
from comfy_harness import PromptFailed, execution_error

pytestmark = pytest.mark.server

PACK_NODES = ("VRAMWiseModelLoader", "VRAMWiseSampler", "VRAMWiseVAEDecode")


def test_pack_registers_every_node_without_import_failures(comfy_server):
    info = comfy_server.object_info()
    for node in PACK_NODES:
        assert node in info, f"{node} missing from /object_info"
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]


def test_loader_lists_diffusers_folders_including_subfolders_and_real_names(comfy_server):
    options = comfy_server.object_info()["VRAMWiseModelLoader"]["input"]["required"]["model"][1]["options"]
    assert "tiny-wan21-i2v" in options
    assert "Wan2.1-I2V-14B-480P-Diffusers" in options


@pytest.mark.parametrize(
    "model,width,height,frames",
    [("tiny-wan21-i2v", 64, 48, 5), ("tiny-wan22-i2v-a14b", 48, 64, 9), ("tiny-wan22-ti2v-5b", 64, 64, 5)],
)
def test_tiny_wan_workflow_produces_requested_frames(comfy_server, model, width, height, frames):
    entry = comfy_server.run(i2v_prompt(model, width=width, height=height, frames=frames))
    _success(entry)
    got = _frames(comfy_server, entry)
    assert len(got) == frames
    assert got[0].size == (width, height)


def test_first_last_frame_model_takes_an_end_image(comfy_server):
    entry = comfy_server.run(i2v_prompt("tiny-wan21-flf2v", end_image=True, frames=5))
    _success(entry)
    assert len(_frames(comfy_server, entry)) == 5


def test_same_seed_repeats_and_other_seed_differs(comfy_server):
    a = _frames(comfy_server, comfy_server.run(i2v_prompt(seed=7)))
    b = _frames(comfy_server, comfy_server.run(i2v_prompt(seed=7)))
    c = _frames(comfy_server, comfy_server.run(i2v_prompt(seed=8)))
    assert [f.tobytes() for f in a] == [f.tobytes() for f in b]
    assert [f.tobytes() for f in a] != [f.tobytes() for f in c]


@pytest.mark.parametrize("offload", ["model", "group", "sequential"])
def test_every_offload_mode_runs_on_a_machine_without_cuda(comfy_server, offload):
    entry = comfy_server.run(i2v_prompt(offload=offload, text_encoder_on_cpu=(offload == "model")))
    _success(entry)
    info = entry["outputs"]["2"]["text"][0]
    assert "no CUDA device" in info


def test_fp8_storage_runs(comfy_server):
    """fp8 storage is applied (the loader says so) and changes the video: a run that ignored it would match bf16."""
    fp8 = comfy_server.run(i2v_prompt(dtype="fp8_e4m3fn", offload="group", seed=5))
    _success(fp8)
    info = fp8["outputs"]["2"]["text"][0]
    assert "WanTransformer3DModel: fp8 storage" in info and "UMT5EncoderModel: fp8 storage" in info, info
    bf16 = comfy_server.run(i2v_prompt(dtype="bf16", offload="group", seed=5))
    _success(bf16)
    assert [f.tobytes() for f in _frames(comfy_server, fp8)] != [f.tobytes() for f in _frames(comfy_server, bf16)]


def test_progress_event_arrives_for_every_step(comfy_server):
    steps = 4
    prompt_id = comfy_server.queue(i2v_prompt(steps=steps, save="preview"))
    _success(comfy_server.wait(prompt_id))
    progress = comfy_server.progress(prompt_id, "3")
    assert [p["value"] for p in progress] == list(range(1, steps + 1))
    assert all(p["max"] == steps for p in progress)


def test_interrupt_mid_run_stops_and_the_next_prompt_succeeds(comfy_server):
    prompt_id = comfy_server.queue(i2v_prompt(steps=200, frames=9, save="preview"))
    comfy_server.wait_for_event(prompt_id, "progress", timeout=120)
    started = time.time()
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert time.time() - started < 30
    progress = comfy_server.progress(prompt_id, "3")
    assert progress[-1]["value"] < 200
    _success(comfy_server.run(i2v_prompt(seed=3)))


def test_interrupt_during_vae_decode_stops_the_decode_and_the_next_prompt_succeeds(comfy_server):
    # 128x128x33 decodes for many seconds on CPU with the tiny VAE: long enough for the interrupt to land inside it.
    prompt_id = comfy_server.queue(i2v_prompt(steps=1, width=128, height=128, frames=33, save="preview"))
    deadline = time.time() + 120
    while not any(e.get("type") == "executing" and e["data"].get("node") == "4" for e in comfy_server.events_for(prompt_id)):
        assert time.time() < deadline, "the decode node never started"
        time.sleep(0.05)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    executed = [e["data"].get("node") for e in comfy_server.events_for(prompt_id) if e.get("type") == "executed"]
    assert "4" not in executed  # the decode did not run to its end
    _success(comfy_server.run(i2v_prompt(seed=4)))


def test_a_request_too_big_for_host_ram_is_refused_up_front_naming_what_to_shrink(comfy_server):
    # 4096x4096x81 needs ~54 GiB of host RAM on a CPU (the decoded frames alone are 16 GiB of float32).
    prompt_id = comfy_server.queue(i2v_prompt(width=4096, height=4096, frames=81, save="preview"))
    entry = comfy_server.wait(prompt_id, timeout=120)
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "VRAMWiseSampler"
    message = error["exception_message"]
    assert message.startswith("width/height/num_frames: 4096x4096x81 needs") and "or smaller at 81 frames" in message
    assert comfy_server.progress(prompt_id, "3") == []  # refused before the first step
    _success(comfy_server.run(i2v_prompt(seed=5)))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"frames": 80}, "num_frames: 80 frames is not of the form 4k+1"),
        ({"width": 70}, "width: 70 is not a multiple of 16"),
        ({"steps": 0}, "steps: must be at least 1"),
        ({"model": "tiny-wan22-ti2v-5b", "width": 48}, "width: 48 is not a multiple of 32"),
        ({"end_image": True}, "end_image: Wan2.1 I2V"),
        ({"resize_mode": "stretch"}, "resize_mode: 'stretch' is not a known resize mode"),
        ({"tiling": "bogus"}, "tiling: 'bogus' is not a known tiling mode"),
        ({"save": "writer", "prefix": "x" * 300}, "filename_prefix: its file name part"),
        ({"save": "writer", "prefix": "y" * 300 + "/clip"}, "filename_prefix: its sub-folder"),
    ],
)
def test_bad_input_fails_with_a_message_naming_the_input_and_fix(comfy_server, overrides, needle):
    entry = comfy_server.run(i2v_prompt(**overrides))
    error = execution_error(entry)
    assert error is not None, entry.get("status")
    assert needle in error["exception_message"]
    assert "Fix:" in error["exception_message"] or "use " in error["exception_message"]
    assert comfy_server.alive()


def test_nearest_valid_frame_counts_are_suggested(comfy_server):
    error = execution_error(comfy_server.run(i2v_prompt(frames=80)))
    assert "use 77 or 81" in error["exception_message"]


@pytest.mark.parametrize("model", ["tiny-wan21-t2v", "tiny-wan22-t2v-a14b"])
def test_unsupported_model_folder_names_what_it_found(comfy_server, model):
    error = execution_error(comfy_server.run(i2v_prompt(model)))
    assert error is not None
    assert "WanPipeline" in error["exception_message"] and "text-to-video" in error["exception_message"]


def test_missing_image_is_rejected_before_running(comfy_server):
    prompt = i2v_prompt()
    del prompt["3"]["inputs"]["image"]
    with pytest.raises(PromptFailed) as failure:
        comfy_server.queue(prompt)
    assert "image" in str(failure.value)


def test_corrupt_weights_give_a_clear_error_and_the_server_keeps_serving(comfy_server, tiny_models_root, tmp_path):
    import shutil

    broken = comfy_server.models_dir / "diffusers" / "broken-wan"
    if not broken.exists():
        shutil.copytree(tiny_models_root / "tiny-wan21-i2v", broken)
        for weights in (broken / "transformer").glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])
    error = execution_error(comfy_server.run(i2v_prompt("broken-wan")))
    assert error is not None
    assert "corrupt" in error["exception_message"]
    _success(comfy_server.run(i2v_prompt(seed=11)))


def test_unknown_model_name_says_where_to_put_models(comfy_server):
    prompt = i2v_prompt()
    prompt["2"]["inputs"]["model"] = "no-such-model"
    try:
        message = execution_error(comfy_server.run(prompt))["exception_message"]
    except PromptFailed as rejected:  # a ComfyUI that validates combo values refuses it up front
        message = str(rejected)
    assert "no-such-model" in message and "models/diffusers" in message
