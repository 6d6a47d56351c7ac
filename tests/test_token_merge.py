"""Token merging: the matching itself, the DiT processors, tomesd on I2VGen-XL, and whole runs on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vramwise.errors import InputError
from vramwise.families.base import GenerationRequest
from vramwise.handles import VramwiseModel
from vramwise.image_prep import ResizeMode, fit_image
from vramwise.loader import LoadOptions, load_pipeline
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.sampling import generate
from vramwise.token_merge import (
    DitMergeSettings,
    TokenMergePatch,
    UnetMergeSettings,
    patch_dit,
    patch_unet,
    plan_merge,
    proportional_attention,
    step_active,
)
from vramwise.token_merge.dit import self_attention_modules
from vramwise.token_merge.matching import window_layout
from vramwise.token_merge.unet import spatial_blocks

CPU = torch.device("cpu")
MODELS = {"wan": "tiny-wan21-i2v", "easyanimate": "tiny-easyanimate-v51-inp", "i2vgenxl": "tiny-i2vgenxl"}


def _request(**kw) -> GenerationRequest:
    gen = torch.Generator().manual_seed(0)
    image = fit_image(torch.rand(48, 64, 3, generator=gen), 64, 64, ResizeMode.CROP)
    base = dict(image=image, prompt="a ball rolls", negative_prompt="", width=64, height=64, num_frames=9,
                steps=2, cfg=5.0, seed=3, shift=3.0)
    return GenerationRequest(**{**base, **kw})


def _merge(**kw) -> TokenMergePatch:
    base = dict(ratio=0.5, start_percent=0.0, end_percent=1.0, skip_first_blocks=0, skip_last_blocks=0)
    return TokenMergePatch(**{**base, **kw})


def _load(root, name: str, mode: OffloadMode = OffloadMode.NONE, dtype: WeightDtype = WeightDtype.BF16) -> VramwiseModel:
    return VramwiseModel(load_pipeline(LoadOptions(root / name, mode, dtype), CPU))


# ----------------------------------------------------------------------------- the matching


GRIDS = [(2, 4, 4), (3, 5, 6), (5, 6, 8), (1, 4, 4)]


@pytest.mark.parametrize("window", ["spatial", "spatial+temporal"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_every_token_is_accounted_for_and_the_first_frame_never_merges(grid, window, ratio):
    n = grid[0] * grid[1] * grid[2]
    metric = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(1))
    plan = plan_merge(metric, grid, ratio, window)
    if grid[0] == 1:  # the only frame is the image frame
        assert plan is None
        return
    layout = plan.layout
    frame = grid[1] * grid[2]
    assert torch.equal(layout.protected, torch.arange(frame))
    for b in range(2):
        ids = torch.cat([layout.protected, layout.dst_kept, plan.kept_tok[b], plan.merged_tok[b]])
        assert torch.equal(ids.sort().values, torch.arange(n)), "each token exactly once"
    assert (plan.merged_tok >= frame).all() and (plan.kept_tok >= frame).all() and (layout.dst_kept >= frame).all()
    # sizes count the tokens each destination stands for; keys shrink by exactly the merged count
    assert torch.equal(plan.sizes.sum(1), torch.full((2,), float(layout.dst_kept.numel() + plan.merged_tok.shape[1])))
    assert plan.num_keys == n - plan.merged_tok.shape[1]
    assert plan.merged_tok.shape[1] == min(layout.num_src, round(ratio * (n - frame)))
    x = torch.randn(2, n, 6)
    assert plan.reduce(x).shape == (2, plan.num_keys, 6)
    assert plan.log_size.shape == (2, plan.num_keys)


def test_partners_come_from_the_same_window():
    grid = (3, 8, 8)  # windows of 4x4 tokens (spatial)
    n = 3 * 64
    plan = plan_merge(torch.randn(1, n, 8), grid, 0.6, "spatial")
    dst = plan.layout.dst_kept[plan.target_slot[0]]
    src = plan.merged_tok[0]

    def window_of(t):
        f, rem = divmod(t, 64)
        return f, (rem // 8) // 4, (rem % 8) // 4

    assert all(window_of(int(s)) == window_of(int(d)) for s, d in zip(src, dst))


@pytest.mark.parametrize("impl", ["mask", "fold"])
@pytest.mark.parametrize("window", ["spatial", "spatial+temporal"])
def test_merging_exact_duplicates_gives_size_two_and_unchanged_attention(impl, window):
    """Proportional attention makes merging identical tokens exact: log(size) restores their softmax share."""
    torch.manual_seed(0)
    grid, heads, d = (3, 4, 4), 2, 8
    n = 48
    layout = window_layout(grid, window, 0.5, 1, CPU)
    k = torch.randn(1, n, heads * d)
    v = torch.randn(1, n, heads * d)
    # Give each real destination exactly one identical source twin (the first source of its window that is left).
    twins = []
    for w in range(layout.src_tok.shape[0]):
        srcs = [int(s) for s, ok in zip(layout.src_tok[w], layout.src_valid[w]) if ok]
        for dst, ok in zip(layout.dst_tok[w], layout.dst_valid[w]):
            if ok and srcs:
                s = srcs.pop(0)
                k[:, s], v[:, s] = k[:, dst], v[:, dst]
                twins.append((s, int(dst)))
    ratio = len(twins) / layout.mergeable
    metric = k.view(1, n, heads, d).mean(2)
    plan = plan_merge(metric, grid, ratio, window)
    assert plan.merged_tok.shape[1] == len(twins)
    assert sorted(plan.merged_tok[0].tolist()) == sorted(s for s, _ in twins)
    assert sorted(plan.sizes[0].tolist()) == [1.0] * (layout.dst_kept.numel() - len(twins)) + [2.0] * len(twins)

    q = torch.randn(1, heads, n, d)
    split = lambda t: t.view(1, -1, heads, d).transpose(1, 2)  # noqa: E731
    full = F.scaled_dot_product_attention(q, split(k), split(v))
    merged = proportional_attention(q, split(plan.reduce(k)), split(plan.reduce(v)), plan.log_size, impl)
    assert merged.shape == full.shape
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    # Without the size bias the same merge is not exact: the bias is what makes it so.
    plain = proportional_attention(q, split(plan.reduce(k)), split(plan.reduce(v)), None)
    assert (plain - full).abs().max() > 1e-3


def test_mask_and_fold_agree_on_random_sizes():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 20, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    log_size = torch.rand(2, 11) * 2
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4 + log_size[:, None, None, :], -1) @ v
    for impl in ("mask", "fold"):
        torch.testing.assert_close(proportional_attention(q, k, v, log_size, impl), ref, atol=1e-5, rtol=1e-5)


def test_step_range():
    assert [step_active(i, 10, 0.1, 1.0) for i in range(10)] == [False] + [True] * 9
    assert [step_active(i, 4, 0.0, 0.5) for i in range(4)] == [True, True, False, False]
    assert not any(step_active(i, 4, 0.5, 0.5) for i in range(4))


@pytest.mark.parametrize(
    "kw,name",
    [(dict(ratio=0.95), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
     (dict(window="temporal"), "window"), (dict(skip_first_blocks=-1), "skip_first_blocks")],
)
def test_bad_settings_name_the_input(kw, name):
    with pytest.raises(InputError) as e:
        TokenMergePatch(**kw)
    assert e.value.input_name == name


# ----------------------------------------------------------------------------- processors on the tiny denoisers


@pytest.fixture(scope="module")
def wan(tiny_models_root):
    return _load(tiny_models_root, MODELS["wan"])


@pytest.fixture(scope="module")
def easyanimate(tiny_models_root):
    return _load(tiny_models_root, MODELS["easyanimate"])


@pytest.fixture(scope="module")
def i2vgenxl(tiny_models_root):
    return _load(tiny_models_root, MODELS["i2vgenxl"])


def _wan_inputs(transformer):
    g = torch.Generator().manual_seed(2)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    enc = torch.randn(1, 512, cfg.text_dim, generator=g)
    img = torch.randn(1, 17, cfg.image_dim, generator=g)
    return dict(hidden_states=x.float(), timestep=torch.tensor([500]), encoder_hidden_states=enc,
                encoder_hidden_states_image=img, return_dict=False)


def _easyanimate_inputs(transformer):
    g = torch.Generator().manual_seed(2)
    cfg = transformer.config
    lat = cfg.out_channels
    return dict(hidden_states=torch.randn(1, lat, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 7, cfg.text_embed_dim, generator=g),
                inpaint_latents=torch.randn(1, cfg.in_channels - lat, 3, 8, 8, generator=g), return_dict=False)


@pytest.mark.parametrize("family", ["wan", "easyanimate"])
def test_processor_reproduces_the_stock_attention_when_nothing_merges_and_detach_restores_objects(family, request):
    model = request.getfixturevalue(family)
    transformer = model.loaded.pipe.transformer.float()
    try:
        inputs = (_wan_inputs if family == "wan" else _easyanimate_inputs)(transformer)
        modules = self_attention_modules(transformer)
        originals = [m.processor for m in modules]
        with torch.no_grad():
            ref = transformer(**inputs)[0]
            # A ratio this small merges 0 tokens, so the replacement runs its own q/k/v/RoPE/attention unmerged.
            handle = patch_dit(transformer, DitMergeSettings(ratio=1e-4))
            assert len(handle.swapped) == len(modules)
            same = transformer(**inputs)[0]
            handle.detach()
            handle = patch_dit(transformer, DitMergeSettings(ratio=0.5, skip_first_blocks=1))
            assert len(handle.swapped) == len(modules) - 1
            merged = transformer(**inputs)[0]
            assert handle.state.calls == len(modules) - 1
            assert handle.state.grid == (3, 4, 4)
            handle.set_active(False)
            inactive = transformer(**inputs)[0]
            handle.detach()
            after = transformer(**inputs)[0]
        torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(merged).all() and not torch.allclose(merged, ref)
        assert torch.equal(inactive, ref) and torch.equal(after, ref)
        assert all(m.processor is p for m, p in zip(modules, originals))
        assert not transformer._forward_pre_hooks
    finally:
        transformer.to(torch.bfloat16)


def test_unet_patch_touches_only_spatial_blocks_with_the_frame_size(i2vgenxl):
    unet = i2vgenxl.loaded.pipe.unet
    spatial = spatial_blocks(unet)
    all_blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert 0 < len(spatial) < len(all_blocks)
    classes = {id(m): type(m) for m in all_blocks}
    handle = patch_unet(unet, UnetMergeSettings(ratio=0.5))
    try:
        assert {id(b) for b, _, _ in handle.blocks} == {id(b) for b in spatial}
        temporal = [m for m in all_blocks if id(m) not in {id(b) for b in spatial}]
        assert all(type(m) is classes[id(m)] for m in temporal)
        g = torch.Generator().manual_seed(0)
        cfg = unet.config
        x = torch.randn(2, 4, 3, 8, 12, generator=g).to(unet.dtype)
        with torch.no_grad():
            unet(x, torch.tensor([500, 500]), fps=torch.tensor([16, 16]), image_latents=x.clone(),
                 image_embeddings=torch.randn(2, cfg.cross_attention_dim).to(unet.dtype),
                 encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim).to(unet.dtype))
        assert handle.info["size"] == (8, 12)  # latent H, W (not frames, H as stock tomesd reads it)
    finally:
        handle.detach()
    assert all(type(m) is classes[id(m)] for m in all_blocks)
    assert not any("_tome_info" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks


# ----------------------------------------------------------------------------- whole runs, every family


@pytest.mark.parametrize("family", ["wan", "easyanimate", "i2vgenxl"])
def test_runs_ratio_zero_identical_merge_changes_detach_restores(family, request):
    model = request.getfixturevalue(family)
    req = _request()
    plain = generate(model, req).samples

    off = model.with_patch(_merge(ratio=0.0))
    assert model.patches == () and len(off.patches) == 1  # a clone: the loaded handle stays unpatched
    assert torch.equal(generate(off, req).samples, plain)

    merged = generate(model.with_patch(_merge(ratio=0.5)), req).samples
    assert torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    rel = (merged - plain).norm() / plain.norm()
    assert rel < 0.5, f"merging should perturb, not wreck, the result (relative change {rel:.3f})"

    assert torch.equal(generate(model, req).samples, plain), "detach left the model changed"
    for d in model.loaded.denoisers:
        assert not d._forward_pre_hooks


def test_steps_outside_the_range_and_skipped_blocks_change_nothing(wan):
    req = _request()
    plain = generate(wan, req).samples
    empty_range = wan.with_patch(_merge(start_percent=0.5, end_percent=0.5))
    assert torch.equal(generate(empty_range, req).samples, plain)
    all_skipped = wan.with_patch(_merge(skip_first_blocks=1, skip_last_blocks=1))  # the tiny model has 2 blocks
    assert torch.equal(generate(all_skipped, req).samples, plain)
    late = generate(wan.with_patch(_merge(start_percent=0.5)), _request(steps=2)).samples
    early = generate(wan.with_patch(_merge(end_percent=0.5)), _request(steps=2)).samples
    assert not torch.equal(late, plain) and not torch.equal(early, plain) and not torch.equal(late, early)


def test_two_expert_wan_merges_in_both_transformers(tiny_models_root):
    model = _load(tiny_models_root, "tiny-wan22-i2v-a14b")
    patch = _merge()
    calls = []
    original = patch.attach

    def spy(m, run):
        detach = original(m, run)
        calls.extend(h.state for h in patch._handles)
        return detach

    patch.attach = spy
    generate(model.with_patch(patch), _request(num_frames=5, steps=4, cfg=3.5))
    assert len(calls) == 2 and all(s.calls > 0 for s in calls)


@pytest.mark.parametrize(
    "mode,dtype",
    [(OffloadMode.NONE, WeightDtype.BF16), (OffloadMode.MODEL, WeightDtype.BF16), (OffloadMode.GROUP, WeightDtype.BF16),
     (OffloadMode.SEQUENTIAL, WeightDtype.BF16), (OffloadMode.STREAM, WeightDtype.BF16),
     (OffloadMode.GROUP, WeightDtype.FP8_E4M3FN)],
)
def test_composes_with_every_offload_mode_and_fp8(tiny_models_root, mode, dtype):
    """Processors are not modules: offload hooks, fp8 casting and stream's batch-2 CFG forward are unaffected."""
    model = _load(tiny_models_root, MODELS["wan"], mode, dtype)
    req = _request(num_frames=5)
    plain = generate(model, req).samples
    patch = _merge()
    merged = generate(model.with_patch(patch), req).samples
    assert torch.isfinite(merged).all() and not torch.equal(merged, plain)
    assert torch.equal(generate(model, req).samples, plain)
    modules = self_attention_modules(model.loaded.pipe.transformer)
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for m in modules)


def test_unsupported_denoiser_is_refused_with_the_fix(wan):
    class Fake:
        loaded = type("L", (), {"denoisers": [torch.nn.Linear(2, 2)]})()
        family = wan.family

    with pytest.raises(InputError, match="remove the Token Merge node"):
        _merge().attach(Fake(), None)


def test_log_size_is_log_of_member_count():
    plan = plan_merge(torch.randn(1, 2 * 16, 4), (2, 4, 4), 0.5, "spatial")
    sizes = plan.sizes[0]
    start = plan.layout.protected.numel()
    torch.testing.assert_close(plan.log_size[0, start : start + sizes.numel()], sizes.log())
    assert math.isclose(float(sizes.sum()) + plan.kept_tok.shape[1], 16.0)  # the second frame's tokens


def test_grouped_attention_equals_the_size_biased_softmax():
    """``groups``: one plain attention per distinct size, combined by log-sum-exp, is the biased softmax."""
    torch.manual_seed(4)
    b, h, sq, m, d = 2, 3, 20, 17, 16
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for s in (sq, m, m))
    sizes = torch.randint(1, 6, (b, m)).double()
    sizes[0, :5] = 1.0  # a large size-1 group, as in a merge plan
    log_size = sizes.log()
    logits = q @ k.transpose(-1, -2) / 4 + log_size[:, None, None, :]
    ref = torch.softmax(logits, -1) @ v
    got = proportional_attention(q, k, v, log_size, "groups")
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    # Same as the bias paths in float32, and all sizes equal (the bias cancels) takes the plain path.
    q32, k32, v32, ls32 = q.float(), k.float(), v.float(), log_size.float()
    torch.testing.assert_close(
        proportional_attention(q32, k32, v32, ls32, "groups"), proportional_attention(q32, k32, v32, ls32, "mask"),
        atol=1e-5, rtol=1e-5,
    )
    flat = torch.full((b, m), math.log(3.0), dtype=torch.float64)
    torch.testing.assert_close(proportional_attention(q, k, v, flat, "groups"), F.scaled_dot_product_attention(q, k, v))


def test_grouped_attention_makes_merged_duplicates_exact_through_a_real_plan():
    torch.manual_seed(5)
    grid, heads, d = (3, 4, 4), 2, 8
    n = 48
    base = torch.randn(1, n // 2, heads * d)
    k = base.repeat_interleave(2, dim=1)  # neighbouring duplicates: sizes 1, 2, 3... once merged
    v = torch.randn(1, n // 2, heads * d).repeat_interleave(2, dim=1)
    plan = plan_merge(k.view(1, n, heads, d).mean(2), grid, 0.5, "spatial")
    assert plan.sizes.unique().numel() > 1
    q = torch.randn(1, heads, n, d)
    split = lambda t: t.view(1, -1, heads, d).transpose(1, 2)  # noqa: E731
    rk, rv = split(plan.reduce(k)), split(plan.reduce(v))
    torch.testing.assert_close(
        proportional_attention(q, rk, rv, plan.log_size, "groups"),
        proportional_attention(q, rk, rv, plan.log_size, "mask"), atol=1e-5, rtol=1e-5,
    )


def test_combine_partial_attention_is_order_free_and_matches_one_softmax():
    from vramwise.token_merge.matching import attention_with_lse, combine_partial_attention

    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    parts = [attention_with_lse(q, k[:, :, a:z], v[:, :, a:z], 0.5) for a, z in ((0, 7), (7, 10), (10, 12))]
    log_w = [0.0, math.log(2.0), math.log(5.0)]
    bias = torch.tensor([0.0] * 7 + [math.log(2.0)] * 3 + [math.log(5.0)] * 2)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1) @ v
    for order in ([0, 1, 2], [2, 0, 1]):
        outs, lses = [parts[i][0] for i in order], [parts[i][1] for i in order]
        got = combine_partial_attention(outs, lses, [log_w[i] for i in order])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
