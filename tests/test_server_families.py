"""EasyAnimate V5.1 InP and I2VGen-XL inside a real ComfyUI server: runs, seeds, progress, Cancel, bad input."""

from __future__ import annotations

import time

import pytest
from api_prompts import assert_success as _success
from api_prompts import i2v_prompt
from api_prompts import saved_frames as _frames
from comfy_harness import execution_error

pytestmark = pytest.mark.server

EASYANIMATE = "tiny-easyanimate-v51-inp"
I2VGENXL = "tiny-i2vgenxl"
# Per model: sizes each family accepts (EasyAnimate 16 px / 4k+1 frames,
# I2VGen-XL 8 px / any frame count).
RUNS = {
    EASYANIMATE: dict(width=80, height=64, frames=5, end_image=True),
    I2VGENXL: dict(width=72, height=64, frames=3, end_image=False),
}


def _prompt(model: str, **overrides):
    values = dict(RUNS[model], shift=1.0)
    values.update(overrides)
    return i2v_prompt(model, **values)


@pytest.mark.parametrize("model", [EASYANIMATE, I2VGENXL])
def test_family_runs_with_requested_frames_and_size(comfy_server, model):
    entry = comfy_server.run(_prompt(model))
    _success(entry)
    frames = _frames(comfy_server, entry)
    assert len(frames) == RUNS[model]["frames"]
    assert frames[0].size == (RUNS[model]["width"], RUNS[model]["height"])
    label = "EasyAnimate V5.1 InP" if model == EASYANIMATE else "I2VGen-XL"
    assert label in entry["outputs"]["2"]["text"][0]


@pytest.mark.parametrize("real_name", ["EasyAnimateV5.1-7b-zh-InP-diffusers", "i2vgen-xl"])
def test_published_folder_names_are_recognised(comfy_server, real_name):
    model = EASYANIMATE if real_name.startswith("EasyAnimate") else I2VGENXL
    prompt = _prompt(model, steps=1, save="preview")
    prompt["2"]["inputs"]["model"] = real_name
    _success(comfy_server.run(prompt))


@pytest.mark.parametrize("model", [EASYANIMATE, I2VGENXL])
def test_same_seed_repeats_and_other_seed_differs(comfy_server, model):
    a = _frames(comfy_server, comfy_server.run(_prompt(model, seed=21)))
    b = _frames(comfy_server, comfy_server.run(_prompt(model, seed=21)))
    c = _frames(comfy_server, comfy_server.run(_prompt(model, seed=22)))
    assert [f.tobytes() for f in a] == [f.tobytes() for f in b]
    assert [f.tobytes() for f in a] != [f.tobytes() for f in c]


@pytest.mark.parametrize("model", [EASYANIMATE, I2VGENXL])
def test_progress_event_arrives_for_every_step(comfy_server, model):
    steps = 3
    prompt_id = comfy_server.queue(_prompt(model, steps=steps, save="preview"))
    _success(comfy_server.wait(prompt_id))
    progress = comfy_server.progress(prompt_id, "3")
    assert [p["value"] for p in progress] == list(range(1, steps + 1))
    assert all(p["max"] == steps for p in progress)


@pytest.mark.parametrize("model", [EASYANIMATE, I2VGENXL])
def test_cancel_mid_run_then_the_next_prompt_succeeds(comfy_server, model):
    steps = 200
    prompt_id = comfy_server.queue(_prompt(model, steps=steps, save="preview"))
    comfy_server.wait_for_event(prompt_id, "progress", timeout=120)
    started = time.time()
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert time.time() - started < 30
    progress = comfy_server.progress(prompt_id, "3")
    assert progress[-1]["value"] < steps
    _success(comfy_server.run(_prompt(model, seed=5)))


@pytest.mark.parametrize(
    "model,overrides,needle",
    [
        (EASYANIMATE, {"width": 72}, "width: 72 is not a multiple of 16"),
        (EASYANIMATE, {"frames": 6}, "num_frames: 6 frames is not of the form 4k+1"),
        (I2VGENXL, {"height": 60}, "height: 60 is not a multiple of 8"),
        (I2VGENXL, {"end_image": True}, "end_image: I2VGen-XL cannot take an end frame"),
    ],
)
def test_bad_input_fails_naming_the_input(comfy_server, model, overrides, needle):
    error = execution_error(comfy_server.run(_prompt(model, **overrides)))
    assert error is not None
    assert needle in error["exception_message"]
    assert "Fix:" in error["exception_message"]
    assert comfy_server.alive()


def test_legacy_easyanimate_layout_is_refused_with_the_supported_one(comfy_server):
    prompt = _prompt(EASYANIMATE, save="preview")
    prompt["2"]["inputs"]["model"] = "tiny-easyanimate-v5-legacy"
    error = execution_error(comfy_server.run(prompt))
    assert error is not None
    message = error["exception_message"]
    assert "Bert + T5" in message and "V5.1 InP" in message
    _success(comfy_server.run(_prompt(EASYANIMATE, steps=1, save="preview")))
