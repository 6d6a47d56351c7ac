"""Token merging: the pairing itself, the DiT processors, tomesd on I2VGen-XL, and whole runs on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vramwise.errors import InputError
from vramwise.families.base import GenerationRequest
from vramwise.handles import VramwiseModel
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.sampling import generate
from vramwise.token_merge import (
    DitMergeSettings,
    TokenMergePatch,
    UnetMergeSettings,
    patch_dit,
    patch_unet,
    WINDOWS,
    plan_pairs,
    size_grouped_attention,
    step_active,
)
from vramwise.token_merge.dit import self_attention_modules
from vramwise.token_merge.pairing import WINDOW_TOKENS, greedy_pairs, pair_layout, tokens_to_remove
from vramwise.token_merge.unet import spatial_blocks

from engine_helpers import load_tiny, tiny_wan_request

CPU = torch.device("cpu")
MODELS = {"wan": "tiny-wan21-i2v", "easyanimate": "tiny-easyanimate-v51-inp", "i2vgenxl": "tiny-i2vgenxl"}


def _request(**kw) -> GenerationRequest:
    return tiny_wan_request(**{"num_frames": 9, **kw})


def _merge(**kw) -> TokenMergePatch:
    base = dict(ratio=0.5, start_percent=0.0, end_percent=1.0, skip_first_blocks=0, skip_last_blocks=0)
    return TokenMergePatch(**{**base, **kw})


def _load(root, name: str, mode: OffloadMode = OffloadMode.NONE, dtype: WeightDtype = WeightDtype.BF16) -> VramwiseModel:
    return load_tiny(root / name, mode, dtype)


# ----------------------------------------------------------------------------- the pairing


GRIDS = [(2, 4, 4), (3, 5, 6), (5, 6, 8), (1, 4, 4), (4, 9, 10)]


def _member_sets(plan, row: int) -> list[torch.Tensor]:
    return [ids[row, i] for _, ids in plan.groups for i in range(ids.shape[1])]


@pytest.mark.parametrize("window", ["spatial", "spatial+temporal"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6, 0.75, 0.9])
def test_every_token_is_in_exactly_one_key_and_the_first_frame_never_merges(grid, window, ratio):
    n = grid[0] * grid[1] * grid[2]
    metric = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(1))
    plan = plan_pairs(metric, grid, ratio, window)
    if grid[0] == 1:  # the only frame is the image frame
        assert plan is None
        return
    layout = plan.layout
    frame = grid[1] * grid[2]
    assert torch.equal(layout.fixed[:frame], torch.arange(frame))
    assert layout.fixed.numel() - frame < WINDOW_TOKENS, "only a short tail outside the windows stays unmerged"
    remove = tokens_to_remove(layout, ratio)
    assert abs(remove - min(round(ratio * (n - frame)), layout.windows.shape[0] * 15)) <= 0.05 * (n - frame) / 2
    for b in range(2):
        ids = torch.cat([layout.fixed, *_member_sets(plan, b)])
        assert torch.equal(ids.sort().values, torch.arange(n)), "each token exactly once"
        assert all((m >= frame).all() for m in _member_sets(plan, b))
    assert plan.num_keys == n - remove
    sizes = plan.sizes
    assert sizes == sorted(set(sizes)) and len(sizes) <= 3 and all(s & (s - 1) == 0 for s in sizes)
    x = torch.randn(2, n, 6)
    parts = plan.reduce(x)
    assert [p.shape[0] for p in parts] == [2] * len(sizes) and all(p.shape[2] == 6 for p in parts)
    assert sum(p.shape[1] for p in parts) == plan.num_keys
    assert plan.log_size().shape == (plan.num_keys,)
    # each reduced key is the mean of its members; unmerged tokens (image frame first) come through as they are
    expected = [] if plan.groups[0][0] == 1 else [x[:, layout.fixed]]
    for size, ids in plan.groups:
        means = torch.stack([x[b, ids[b]].mean(1) for b in range(2)])
        expected.append(torch.cat([x[:, layout.fixed], means], 1) if size == 1 else means)
    for got, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ratio,sizes", [(0.25, [1, 2]), (0.5, [1, 2]), (0.6, [1, 2, 4]), (0.75, [1, 4]),
                                         (0.9, [1, 8, 16])])
def test_every_merged_key_stands_for_a_power_of_two_tokens(ratio, sizes):
    grid = (3, 8, 8)  # two frames of whole windows after the image frame
    plan = plan_pairs(torch.randn(1, 3 * 64, 8), grid, ratio, "spatial")
    assert plan.sizes == sizes


def test_a_tail_outside_the_windows_adds_no_tiny_size_group():
    for g in ((2, 30, 52), (3, 45, 80), (4, 33, 61)):  # tails of 8, 0 and 7 tokens after the last window
        for window in WINDOWS:
            plan = plan_pairs(torch.randn(1, g[0] * g[1] * g[2], 8), g, 0.5, window)
            assert plan.sizes == [1, 2]
            assert plan.layout.fixed.numel() - g[1] * g[2] == (g[0] - 1) * g[1] * g[2] % 16


def test_members_of_a_key_come_from_one_window():
    grid = (3, 8, 8)
    plan = plan_pairs(torch.randn(1, 3 * 64, 8), grid, 0.8, "spatial")

    def window_of(t: int) -> tuple[int, int, int]:
        f, rem = divmod(t, 64)
        return f, (rem // 8) // 4, (rem % 8) // 4

    for members in _member_sets(plan, 0):
        assert len({window_of(int(t)) for t in members}) == 1


def test_greedy_pairs_is_one_to_one_and_takes_the_best_pair_first():
    sim = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    partner, score = greedy_pairs(sim)
    assert partner.shape == score.shape == (3, 5, 8)
    assert torch.equal(partner.sort(-1).values, torch.arange(8).expand(3, 5, 8))
    torch.testing.assert_close(score, sim.gather(-2, partner.unsqueeze(-2)).squeeze(-2))
    # the overall best entry of every block is one of the chosen pairs
    assert torch.equal(score.amax(-1), sim.flatten(-2).amax(-1))
    # greedy, not "each destination its favourite": destination 0 prefers source 0 but loses it to destination 1
    partner, _ = greedy_pairs(torch.tensor([[0.8, 0.9], [0.1, 0.0]]))
    assert partner.tolist() == [1, 0]
    nan = greedy_pairs(torch.full((4, 4), float("nan")))[0]
    assert sorted(nan.tolist()) == [0, 1, 2, 3], "a NaN metric still pairs every token once"


def _twin_keys(layout, n: int, channels: int, twins_per_window: int | None = None) -> torch.Tensor:
    """Random tokens where window slots 2i and 2i+1 are identical (for the first ``twins_per_window`` pairs)."""
    x = torch.randn(1, n, channels, generator=torch.Generator().manual_seed(3))
    for win in layout.windows:
        for i in range(twins_per_window if twins_per_window is not None else len(win) // 2):
            x[:, win[2 * i + 1]] = x[:, win[2 * i]]
    return x


@pytest.mark.parametrize("impl", ["groups", "bias"])
@pytest.mark.parametrize("window", ["spatial", "spatial+temporal"])
def test_merging_exact_duplicates_leaves_attention_unchanged(impl, window):
    """Proportional attention makes merging identical tokens exact: each merged key keeps its members' share."""
    grid, heads, d = (3, 4, 8), 2, 8
    n = 3 * 32
    layout = pair_layout(grid, window, 1, CPU)
    k = _twin_keys(layout, n, heads * d)
    v = _twin_keys(layout, n, heads * d)
    plan = plan_pairs(k.view(1, n, heads, d).mean(2), grid, 0.5, window)
    assert plan.sizes == [1, 2]
    for members in _member_sets(plan, 0):
        assert torch.equal(k[0, members[0]], k[0, members[1]]), "the twins were paired"
    q = torch.randn(1, heads, n, d)
    split = lambda t: t.view(1, -1, heads, d).transpose(1, 2)  # noqa: E731
    full = F.scaled_dot_product_attention(q, split(k), split(v))
    keys, values = [split(t) for t in plan.reduce(k)], [split(t) for t in plan.reduce(v)]
    merged = size_grouped_attention(q, keys, values, plan.sizes, impl)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    # Without the size weighting the same merge is not exact: the weighting is what makes it so.
    plain = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2))
    assert (plain - full).abs().max() > 1e-3


def test_a_partial_round_merges_the_most_similar_pairs():
    grid = (3, 4, 8)
    n = 3 * 32
    layout = pair_layout(grid, "spatial", 1, CPU)
    metric = _twin_keys(layout, n, 8, twins_per_window=3)  # 3 identical pairs in each of the 4 windows
    plan = plan_pairs(metric, grid, 12 / 64, "spatial")
    assert plan.sizes == [1, 2] and plan.groups[1][1].shape[1] == 12
    for members in plan.groups[1][1][0]:
        assert torch.equal(metric[0, members[0]], metric[0, members[1]])


@pytest.mark.parametrize("impl", ["groups", "bias"])
def test_size_groups_give_the_size_weighted_softmax(impl):
    torch.manual_seed(4)
    b, h, sq, d = 2, 3, 20, 16
    counts, sizes = [7, 5, 3], [1, 2, 4]
    dtype = torch.float64 if impl == "groups" else torch.float32
    q = torch.randn(b, h, sq, d, dtype=dtype)
    keys = [torch.randn(b, h, m, d, dtype=dtype) for m in counts]
    values = [torch.randn(b, h, m, d, dtype=dtype) for m in counts]
    bias = torch.cat([torch.full((m,), math.log(s), dtype=dtype) for m, s in zip(counts, sizes)])
    ref = torch.softmax(q @ torch.cat(keys, 2).transpose(-1, -2) / 4 + bias, -1) @ torch.cat(values, 2)
    got = size_grouped_attention(q, keys, values, sizes, impl)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    # one group: the size is a constant and cancels
    torch.testing.assert_close(
        size_grouped_attention(q, keys[:1], values[:1], [4], impl), F.scaled_dot_product_attention(q, keys[0], values[0])
    )


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


def test_wan_processor_merging_duplicate_tokens_matches_the_stock_processor(wan):
    """Whole merged self-attention (keys after RoPE, values projected from merged inputs, size groups) is exact
    for duplicate tokens. RoPE is set to the identity so that duplicate inputs give duplicate keys."""
    from vramwise.token_merge.dit import MergeState, WanTokenMergeProcessor

    transformer = wan.loaded.pipe.transformer.float()
    try:
        attn = transformer.blocks[0].attn1
        grid = (3, 4, 8)
        n = 3 * 32
        layout = pair_layout(grid, "spatial+temporal", 1, CPU)
        x = _twin_keys(layout, n, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        d = transformer.config.attention_head_dim
        rotary = (torch.ones(1, n, 1, d), torch.zeros(1, n, 1, d))
        state = MergeState(DitMergeSettings(ratio=0.5, attention_impl="groups"), grid=grid)
        proc = WanTokenMergeProcessor(attn.processor, state)
        with torch.no_grad():
            ref = attn.processor(attn, x, None, None, rotary)
            got = proc(attn, x, None, None, rotary)
        assert state.calls == 1
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        state.settings = DitMergeSettings(ratio=0.75, attention_impl="groups")  # twins only pair up in round 1
        with torch.no_grad():
            assert not torch.allclose(proc(attn, x, None, None, rotary), ref, atol=1e-4)
    finally:
        transformer.to(torch.bfloat16)


@pytest.mark.parametrize("impl", ["groups", "bias"])
def test_merging_blocks_trace_as_one_graph_for_the_stream_engines_compile(wan, impl):
    """The stream engine compiles each block with ``fullgraph=True``: the merge must not break the graph."""
    transformer = wan.loaded.pipe.transformer.float()
    inputs = _wan_inputs(transformer)
    handle = patch_dit(transformer, DitMergeSettings(ratio=0.5, attention_impl=impl))
    try:
        with torch.no_grad():
            eager = transformer(**inputs)[0]
            for block in transformer.blocks:
                block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, backend="eager")
            traced = transformer(**inputs)[0]
        assert handle.state.calls == 2 * len(transformer.blocks)
        torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
    finally:
        handle.detach()
        for block in transformer.blocks:
            block.__dict__.pop("forward", None)
        torch._dynamo.reset()
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


def test_combine_partial_attention_is_order_free_and_matches_one_softmax():
    from vramwise.token_merge.attention import attention_with_lse, combine_partial_attention

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
