"""Planner arithmetic, step-down order and the out-of-memory retry loop (fake OOM)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vramwise.memory import planner
from vramwise.memory.estimates import DenoiserShape, activation_bytes, folder_component_bytes, tokens

GiB = 2**30
WAN14B = {"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40, "ffn_dim": 13824,
          "added_kv_proj_dim": 5120, "patch_size": [1, 2, 2]}


def _comp():
    d = DenoiserShape.from_config(WAN14B, total_bytes=int(32.8e9))
    return planner.Components((d,), {"text_encoder": int(11.4e9), "vae": int(0.25e9), "image_encoder": int(1.3e9)})


def test_token_and_activation_arithmetic():
    assert tokens(21, 60, 104) == 32760
    assert tokens(9, 60, 104) == 14040
    assert activation_bytes(32760, 5120, 2) == int(32760 * 2 * 5120 * 21.6)


# Peaks measured on an H200 (bench/RESULTS.md, "Offload engine", round 2: lean forward, eager, batch-2 CFG step,
# torch.cuda.max_memory_allocated); the issue asks for estimates within +-15% of them.
MEASURED_GIB = {("stream", False, 21): 3.85, ("stream", False, 9): 2.75, ("stream", True, 21): 3.19,
                ("stream", True, 9): 2.10, ("none", False, 21): 37.53, ("none", False, 9): 33.57}


@pytest.mark.parametrize("key", list(MEASURED_GIB), ids=lambda k: f"{k[0]}-fp8={k[1]}-latent_frames={k[2]}")
def test_wan14b_estimates_are_within_15_percent_of_the_measured_peaks(key):
    offload, fp8, latent_frames = key
    comp = planner.Components(_comp().denoisers, {})  # the denoising phase alone, as the bench measured it
    est = planner.estimate(planner.Plan(offload, fp8=fp8), comp, planner.RunShape(latent_frames, 60, 104, True))
    assert est.allocated_peak / GiB == pytest.approx(MEASURED_GIB[key], rel=0.15)
    # what must be free adds the allocator's slack and the CUDA context on top
    assert est.vram_peak > est.allocated_peak


def test_stream_pins_the_blocks_once_and_fp8_halves_it():
    comp, run81 = planner.Components(_comp().denoisers, {}), planner.RunShape(21, 60, 104, True)
    est = planner.estimate(planner.Plan("stream"), comp, run81)
    assert est.pinned_bytes > 28 * GiB
    fp8 = planner.estimate(planner.Plan("stream", fp8=True), comp, run81)
    assert fp8.pinned_bytes == pytest.approx(est.pinned_bytes / 2, rel=0.01)


def test_plans_are_ordered_fastest_first_and_each_needs_less_vram():
    comp, run = _comp(), planner.RunShape(21, 60, 104, True)
    # the one-expert plan (two experts sharing one set of pinned buffers) needs stream fp8's VRAM: it saves host RAM
    peaks = [planner.estimate(p, comp, run).vram_peak for p in planner.PLANS if not p.one_expert]
    assert peaks[0] > peaks[1] >= peaks[2] > peaks[3]
    # sequential (stock forward, every layer fetched) stays the last resort: slowest, and since the stream
    # engine's lean forward no longer smaller than stream fp8 with CFG passes one after the other
    assert peaks[4] < peaks[1]
    assert planner.PLANS[0].offload == "none" and planner.PLANS[-1].offload == "sequential"


def test_choose_picks_fastest_that_fits_and_refuses_with_smallest_settings():
    run = planner.RunShape(21, 60, 104, True)
    # UMT5-XXL (11 GB) moves whole for the all-on-GPU plan, streams layer by layer in the stream plans
    assert planner.choose(_comp(), run, 7 * GiB, 200 * GiB).plan.offload == "stream"
    assert planner.estimate(planner.Plan("none"), _comp(), run).vram_peak > 40 * GiB
    with pytest.raises(planner.NothingFits, match="text_encoder_on_cpu"):
        planner.choose(_comp(), run, 2 * GiB, 200 * GiB)
    comp = planner.Components(_comp().denoisers, {"vae": int(0.25e9), "image_encoder": int(1.3e9)})
    assert planner.choose(comp, run, 80 * GiB, 200 * GiB).plan == planner.Plan("none")
    assert planner.choose(comp, run, 16 * GiB, 200 * GiB).plan.offload == "stream"
    assert planner.choose(comp, run, 7 * GiB, 200 * GiB).plan == planner.Plan("stream")
    small = planner.choose(comp, run, 4.2 * GiB, 200 * GiB).plan
    assert small.offload in ("stream", "sequential") and small.fp8
    with pytest.raises(planner.NothingFits) as err:
        planner.choose(comp, run, 1 * GiB, 200 * GiB)
    assert "num_frames" in str(err.value)
    # host RAM too small for bf16 pinned weights -> fp8
    assert planner.choose(comp, run, 16 * GiB, 30 * GiB).plan.fp8


def test_oom_retry_steps_down_until_it_fits():
    plans = [planner.PLANS[0]]
    calls = []
    freed = []

    def attempt():
        calls.append(plans[-1])
        if len(calls) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return "latents"

    report = []
    out = planner.run_with_step_down(attempt, lambda: plans[-1], plans.append, lambda: freed.append(1), report)
    assert out == "latents"
    assert calls == list(planner.PLANS[:3]) and len(freed) == 2
    assert "retried with" in report[0]


def test_oom_on_the_safest_plan_is_a_clear_error_and_other_errors_pass_through():
    def oom():
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(planner.NothingFits, match="safest plan"):
        planner.run_with_step_down(oom, lambda: planner.PLANS[-1], lambda p: None, lambda: None)
    with pytest.raises(KeyError):
        planner.run_with_step_down(lambda: {}["x"], lambda: planner.PLANS[0], lambda p: None, lambda: None)


def test_component_bytes_from_safetensors_headers(tiny_models_root):
    sizes = folder_component_bytes(tiny_models_root / "tiny-wan21-i2v")
    assert {"transformer", "vae", "text_encoder"} <= set(sizes)
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel.from_pretrained(tiny_models_root / "tiny-wan21-i2v" / "transformer")
    assert sizes["transformer"] == sum(p.numel() * p.element_size() for p in m.parameters())


def test_floors_raise_the_auto_choice():
    planner.clear_floors()
    planner.set_floor("k", planner.PLANS[2])
    assert planner.floor_for("k") == 2
    planner.set_floor("k", planner.PLANS[1])
    assert planner.floor_for("k") == 2
    planner.clear_floors()


def test_shapes_read_unet_and_easyanimate_style_configs():
    from vramwise.memory.estimates import DenoiserShape

    unet = DenoiserShape.from_config({"num_attention_heads": None, "attention_head_dim": [64, 64, 64, 64]}, 10**9)
    assert unet.hidden == 40 * 64 and unet.patch == (1, 2, 2)
    dit = DenoiserShape.from_config({"num_attention_heads": 48, "attention_head_dim": 64, "patch_size": 2}, 10**9)
    assert dit.patch == (1, 2, 2) and dit.hidden == 3072


def test_token_merge_estimates_follow_the_measured_merged_peaks():
    comp, run = planner.Components(_comp().denoisers, {}), planner.RunShape(21, 60, 104, True)
    merged_run = replace(run, token_merge=True)
    # measured on an H100 (bench/RESULTS.md, "Token merge, round 3"), 81 frames, batch-2 CFG, compiled
    lean = planner.estimate(planner.Plan("stream"), comp, merged_run, compiled=True)
    assert lean.allocated_peak / GiB == pytest.approx(4.81, rel=0.15)
    assert lean.allocated_peak > planner.estimate(planner.Plan("stream"), comp, run).allocated_peak
    # plans without the lean forward hold the merged attention's full tensors
    for plan in (planner.Plan("none"), planner.Plan("sequential")):
        assert (planner.estimate(plan, comp, merged_run).allocated_peak
                - planner.estimate(plan, comp, run).allocated_peak) > GiB


def test_token_merge_sits_out_a_run_only_when_it_alone_breaks_the_budget():
    comp, run = planner.Components(_comp().denoisers, {}), planner.RunShape(21, 60, 104, True, token_merge=True)
    stream = planner.Plan("stream")
    plain = planner.estimate(stream, comp, replace(run, token_merge=False)).vram_peak
    merged = planner.estimate(stream, comp, run).vram_peak
    between = (plain + merged) // 2
    why = planner.token_merge_conflict(stream, comp, run, between)
    assert why is not None and "token merge off" in why and "vram_budget_gb" in why
    assert planner.token_merge_conflict(stream, comp, run, merged) is None  # fits merged
    assert planner.token_merge_conflict(stream, comp, run, plain - GiB) is None  # fits neither way
    assert planner.token_merge_conflict(stream, comp, replace(run, token_merge=False), between) is None
