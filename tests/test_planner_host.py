"""The planner under host-RAM budgets, on the published Wan2.1 I2V 14B and Wan2.2 I2V A14B configs."""

from __future__ import annotations

import pytest
import torch

from vramwise.errors import InputError
from vramwise.memory import planner
from vramwise.memory.estimates import DenoiserShape

from test_planner import WAN14B

GiB = 2**30
# The published diffusers configs (Wan-AI/*-Diffusers transformer/config.json); A14B experts have no image branch.
A14B_EXPERT = {k: v for k, v in WAN14B.items() if k != "added_kv_proj_dim"}
# bf16 bytes from the published safetensors headers: Wan2.1 I2V 14B transformer 32.8 GB, each A14B expert
# 28.6 GB, UMT5-XXL 11.4 GB (fp8 storage keeps wo/norms/embeddings bf16: 6.2 GB), CLIP-H 1.3 GB, Wan VAE 0.25 GB.
TE_BF16, TE_FP8 = int(11.4e9), int(6.2e9)
RUN = planner.DEFAULT_RUN


def wan21(te: int = TE_BF16) -> planner.Components:
    d = DenoiserShape.from_config(WAN14B, total_bytes=int(32.8e9))
    return planner.Components((d,), {"text_encoder": te, "image_encoder": int(1.3e9), "vae": int(0.25e9)})


def a14b(te: int = TE_BF16) -> planner.Components:
    d = DenoiserShape.from_config(A14B_EXPERT, total_bytes=int(28.6e9))
    return planner.Components((d, d), {"text_encoder": te, "vae": int(0.25e9)})


def choose(comp: planner.Components, host_gib: float) -> planner.Estimate:
    return planner.choose(comp, RUN, vram_budget=12 * GiB, host_budget=int(host_gib * GiB))


@pytest.mark.parametrize("comp,host,plan", [
    (wan21(), 64, planner.Plan("stream")),
    (wan21(), 32, planner.Plan("stream", fp8=True)),
    (wan21(TE_FP8), 24, planner.Plan("stream", fp8=True)),  # weight_dtype fp8: the text encoder is fp8 too
    (a14b(), 64, planner.Plan("stream", fp8=True)),
], ids=["wan21-64GiB", "wan21-32GiB", "wan21-fp8-24GiB", "a14b-64GiB"])
def test_a_12gib_card_gets_the_fastest_plan_whose_host_ram_fits(comp, host, plan):
    est = choose(comp, host)
    assert est.plan == plan
    assert est.host_bytes <= host * GiB and est.pinned_bytes <= est.host_bytes
    faster = planner.PLANS[: planner.PLANS.index(plan)]
    # each faster plan the card could run was passed over for host RAM alone
    assert all(planner.estimate(p, comp, RUN).host_bytes > host * GiB for p in faster if p.offload != "none")


ONE = planner.Plan("stream", fp8=True, one_expert=True)


@pytest.mark.parametrize("comp,host", [(wan21(), 24), (a14b(), 20), (a14b(TE_FP8), 16)],
                         ids=["wan21-24GiB", "a14b-20GiB", "a14b-fp8-16GiB"])
def test_when_nothing_fits_the_host_budget_the_refusal_names_what_would(comp, host):
    text = planner.host_refusal(comp, RUN, int(host * GiB))
    bf16 = planner.estimate(planner.Plan("stream"), comp, RUN).host_bytes / GiB
    fp8 = planner.estimate(planner.Plan("stream", fp8=True), comp, RUN).host_bytes / GiB
    need = min(fp8, planner.estimate(ONE, comp, RUN).host_bytes / GiB) if comp.allows(ONE) else fp8
    assert need > host
    assert f"~{bf16:.1f} GiB of host RAM in bf16 and ~{fp8:.1f} GiB with fp8 storage" in text
    assert f"budget is {host:.1f} GiB" in text
    assert "smaller model" in text and f"raise host_ram_budget_gb to at least {need:.1f}" in text
    assert "Fix: weight_dtype fp8_e4m3fn" not in text  # fp8 does not fit either, so it is not offered
    with pytest.raises(planner.NothingFits):
        choose(comp, host)


@pytest.mark.parametrize("comp,host,one_expert", [(a14b(), 32, True), (a14b(TE_FP8), 24, True),
                                                   (a14b(), 40, False), (wan21(), 32, False)],
                         ids=["a14b-32GiB", "a14b-fp8-24GiB", "a14b-40GiB", "wan21-32GiB"])
def test_only_where_both_experts_do_not_fit_is_one_pinned_at_a_time(comp, host, one_expert):
    pre = planner.host_preplan(comp, int(host * GiB))
    assert pre.fp8 and pre.one_expert is one_expert
    if one_expert:  # what the loader places then: the one-expert plan, within the budget
        est = planner.estimate(ONE, comp, RUN)
        assert est.host_bytes <= host * GiB and est.pinned_bytes * 2 == pytest.approx(
            planner.estimate(planner.Plan("stream", fp8=True), comp, RUN).pinned_bytes)


def test_the_run_time_planner_and_the_oom_step_down_never_enter_the_one_expert_plan():
    comp = a14b()
    with pytest.raises(planner.NothingFits):
        planner.choose(comp, RUN, vram_budget=12 * GiB, host_budget=32 * GiB)  # only a load can leave blocks unread
    assert planner.next_plan(planner.Plan("stream", fp8=True)) == planner.Plan("stream", fp8=True, cfg_batch=False)
    assert planner.choose(comp, RUN, 12 * GiB, 32 * GiB, floor=planner.ONE_EXPERT).plan == ONE


def test_the_refusal_offers_fp8_when_fp8_would_fit():
    text = planner.host_refusal(wan21(), RUN, 30 * GiB)
    assert "Fix: weight_dtype fp8_e4m3fn" in text


def test_host_budget_zero_means_available_plus_what_the_model_already_holds(monkeypatch):
    monkeypatch.setattr(planner, "host_available_bytes", lambda: 10 * GiB)
    assert planner.host_budget(0, held=4 * GiB) == 14 * GiB - planner.DEFAULT_HOST_HEADROOM
    assert planner.host_budget(24.0, held=4 * GiB) == 24 * GiB


def _tiny_loaded(tiny_models_root, mode="auto", budget_gb=0.0):
    from vramwise.loader import LoadOptions, load_pipeline
    from vramwise.offload import OffloadMode
    from vramwise.precision import WeightDtype

    options = LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode(mode), WeightDtype.BF16,
                          host_ram_budget_gb=budget_gb)
    return load_pipeline(options, torch.device("cpu"))


def test_auto_load_picks_fp8_storage_when_only_it_fits_the_host_budget(tiny_models_root):
    loaded = _tiny_loaded(tiny_models_root)
    comp = planner.components_of(loaded.pipe, loaded.family.denoiser_names)
    bf16 = planner.estimate(planner.Plan("stream"), comp, RUN).host_bytes
    fp8 = planner.estimate(planner.Plan("stream", fp8=True), comp, RUN).host_bytes
    assert loaded.placement.plan.plan == planner.Plan("stream")
    squeezed = _tiny_loaded(tiny_models_root, budget_gb=(bf16 + fp8) / 2 / GiB)
    assert squeezed.placement.plan.plan == planner.Plan("stream", fp8=True)
    assert "host RAM" in squeezed.placement.describe()
    budget = (bf16 + fp8) / 2 / GiB
    assert f"GiB pinned) of a {budget:.1f} GiB budget" in "\n".join(squeezed.notes)  # what the loader shows
    with pytest.raises(InputError, match="host_ram_budget_gb.*fp8 storage.*Fix: .*smaller model"):
        _tiny_loaded(tiny_models_root, budget_gb=fp8 / 4 / GiB)


def test_stream_never_pins_more_than_the_host_budget(tiny_models_root):
    loaded = _tiny_loaded(tiny_models_root, mode="stream")
    pinned = sum(e.block_bytes for e in loaded.placement.stream_engines)
    roomy = _tiny_loaded(tiny_models_root, mode="stream", budget_gb=1.0)
    assert "at most" in "\n".join(roomy.notes) and all(e.pinned_cap_bytes < GiB for e in roomy.placement.stream_engines)
    with pytest.raises(InputError, match="offload_mode.*pinned host memory"):
        _tiny_loaded(tiny_models_root, mode="stream", budget_gb=pinned / 2 / GiB)


def test_the_folder_preplan_matches_the_loaded_components(tiny_models_root):
    loaded = _tiny_loaded(tiny_models_root, mode="none")
    live = planner.components_of(loaded.pipe, loaded.family.denoiser_names)
    folder = planner.components_from_folder(tiny_models_root / "tiny-wan21-i2v", loaded.family.denoiser_names)
    assert folder.others == pytest.approx(live.others, rel=0.02)
    assert folder.denoiser_bytes == live.denoiser_bytes  # fp32 modules and the built rotary tables included
    assert folder.denoisers[0].layers == live.denoisers[0].layers


def _reads(monkeypatch) -> list[tuple[str, torch.dtype]]:
    from vramwise import weight_loading

    reads, real = [], weight_loading.read_tensor
    monkeypatch.setattr(weight_loading, "read_tensor", lambda f, st, dtype: reads.append((st.name, dtype)) or real(f, st, dtype))
    return reads


def test_a_host_budget_only_fp8_fits_reads_the_denoiser_straight_into_fp8(tiny_models_root, monkeypatch):
    folder = planner.components_from_folder(tiny_models_root / "tiny-wan21-i2v", ("transformer",))
    bf16 = planner.estimate(planner.Plan("stream"), folder, RUN).host_bytes
    fp8 = planner.estimate(planner.Plan("stream", fp8=True), folder, RUN).host_bytes
    reads = _reads(monkeypatch)
    squeezed = _tiny_loaded(tiny_models_root, budget_gb=(bf16 + fp8) / 2 / GiB)
    q = [dtype for name, dtype in reads if name == "blocks.0.attn1.to_q.weight"]
    assert q == [torch.float8_e4m3fn]  # never held in bf16 first
    assert squeezed.placement.plan.plan.fp8
    assert any("read straight into fp8" in n for n in squeezed.notes)
    reads.clear()
    roomy = _tiny_loaded(tiny_models_root, budget_gb=bf16 * 2 / GiB)
    assert [d for n, d in reads if n == "blocks.0.attn1.to_q.weight"] == [torch.bfloat16]
    assert roomy.placement.plan.plan == planner.Plan("stream")


def test_a_host_budget_nothing_fits_is_refused_before_any_weight_is_read(tiny_models_root, monkeypatch):
    folder = planner.components_from_folder(tiny_models_root / "tiny-wan21-i2v", ("transformer",))
    fp8 = planner.estimate(planner.Plan("stream", fp8=True), folder, RUN).host_bytes
    reads = _reads(monkeypatch)
    with pytest.raises(InputError, match="host_ram_budget_gb.*Fix: .*smaller model"):
        _tiny_loaded(tiny_models_root, budget_gb=fp8 / 4 / GiB)
    assert reads == []
