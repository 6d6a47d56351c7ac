"""Step cache (``vramwise.step_cache``) on the tiny models: exactness when off, forced schedules, state per run and
per expert, stream (a skipped step fetches no block), CFG batching, token merge, Cancel, OOM step-down, refusals."""

from __future__ import annotations

import pytest
import torch

from vramwise.errors import InputError
from vramwise.handles import patch_note
from vramwise.memory import planner
from vramwise.offload import OffloadMode
from vramwise.sampling import generate
from vramwise.step_cache import StepCachePatch
from vramwise.step_cache.easycache import EasyCacheRule
from vramwise.step_cache.magcache import MagCacheRule, ratios_for_steps
from vramwise.step_cache.published import MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS
from vramwise.step_cache.rule import StepView
from vramwise.step_cache.teacache import TeaCacheRule
from vramwise.token_merge import TokenMergePatch

from engine_helpers import Cancelled, Recorder, load_tiny, tiny_wan_request

WAN = "tiny-wan21-i2v"


def _fixed(**kw) -> StepCachePatch:
    return StepCachePatch(**{"method": "fixed", "start_percent": 0.0, "end_percent": 1.0,
                             "max_consecutive_skips": 1, **kw})


class StepLog(Recorder):
    """Records, per denoising step, the computed forwards of each denoiser (the condition embedder runs once per
    computed forward, never on a skipped one) and the stream engines' block loads."""

    def __init__(self, model, cancel_at=None) -> None:
        super().__init__(cancel_at)
        self.step = 0
        self.computed: dict[str, dict[int, int]] = {}
        self.loads: dict[int, int] = {}  # stream block copies issued during each step
        self.block_runs: dict[int, int] = {}  # streamed blocks run during each step
        self.handles = []
        pipe = model.loaded.pipe
        for name in model.family.denoiser_names:
            d = getattr(pipe, name, None)
            if d is None:
                continue
            self.computed[name] = {}
            self.handles.append(d.condition_embedder.register_forward_pre_hook(self._hook(name)))
        self.engines = _engines(model)
        for e in self.engines:
            e.trace_enabled = True
            e.trace.clear()

    def _hook(self, name):
        def hook(module, args):
            steps = self.computed[name]
            steps[self.step] = steps.get(self.step, 0) + 1
        return hook

    def _count_loads(self) -> None:
        for kind, into in (("load", self.loads), ("run", self.block_runs)):
            n = sum(1 for e in self.engines for k, *_ in e.trace if k == kind)
            into[self.step] = n - sum(into.values())

    def on_step(self, step, total, latents) -> None:
        self._count_loads()
        self.step = step
        super().on_step(step, total, latents)

    def computed_steps(self, name: str = "transformer") -> list[int]:
        return sorted(self.computed[name])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for e in self.engines:
            e.trace_enabled = False
            e.trace.clear()


def _engines(model) -> list:
    return list(model.loaded.placement.stream_engines)


def _run(model, req, observer=None):
    return generate(model, req, observer).samples


@pytest.fixture(scope="module")
def wan(tiny_models_root):
    return load_tiny(tiny_models_root / WAN)


@pytest.fixture(scope="module")
def wan_stream(tiny_models_root):
    return load_tiny(tiny_models_root / WAN, OffloadMode.STREAM)


def _forwards(model) -> list:
    return [d.__dict__.get("forward") for d in model.loaded.denoisers]


# ----------------------------------------------------------------------------------------------- exactness when off
def test_threshold_zero_and_an_empty_window_are_bit_identical_to_no_cache(wan):
    req = tiny_wan_request(steps=6)
    plain = _run(wan, req)
    before = _forwards(wan)
    assert torch.equal(_run(wan.with_patch(StepCachePatch(threshold=0)), req), plain)
    # An empty window attaches the wrapper but never skips: computed outputs pass through untouched.
    empty = _fixed(start_percent=0.5, end_percent=0.5)
    assert torch.equal(_run(wan.with_patch(empty), req), plain)
    assert empty.last_counts == {"transformer": (6, 0)}
    assert _forwards(wan) == before, "detach left a wrapper on the denoiser"
    assert wan.patches == ()


# ----------------------------------------------------------------------------------------------- forced schedules
def test_a_fixed_schedule_skips_exactly_the_steps_it_says(wan):
    # 10 steps, window 0.2..0.8 = steps 2..7, at most 2 skipped in a row -> skip 2, 3, compute 4, skip 5, 6,
    # compute 7 (limit reached), then 8 and 9 are outside the window.
    patch = _fixed(start_percent=0.2, end_percent=0.8, max_consecutive_skips=2)
    log = StepLog(wan)
    try:
        out = _run(wan.with_patch(patch), tiny_wan_request(steps=10), log)
    finally:
        log.close()
    assert log.computed_steps() == [0, 1, 4, 7, 8, 9]
    assert all(n == 2 for n in log.computed["transformer"].values()), "cond and uncond both run on computed steps"
    assert patch.last_counts == {"transformer": (6, 4)}
    assert "transformer: 6 computed, 4 skipped" in patch_note(patch)
    assert torch.isfinite(out).all()


def test_every_other_step_is_half_the_run_and_changes_the_result_a_little(wan):
    req = tiny_wan_request(steps=8)
    plain = _run(wan, req)
    patch = _fixed()
    log = StepLog(wan)
    try:
        cached = _run(wan.with_patch(patch), req, log)
    finally:
        log.close()
    assert log.computed_steps() == [0, 2, 4, 6]
    assert not torch.equal(cached, plain)
    rel = float((cached - plain).norm() / plain.norm())
    assert rel < 0.5, f"reusing residuals should perturb, not wreck, the result ({rel:.3f})"


def test_a_skipped_call_returns_the_new_input_plus_the_cached_residual(wan):
    """The skipped output is exactly x_now[:, :16] + (out_prev - x_prev[:, :16]), in the output's dtype."""
    d = wan.loaded.pipe.transformer
    seen = []
    inner_calls = []

    def outer(module, args, kwargs, output):
        seen.append((kwargs["hidden_states"].clone(), output[0].clone()))

    h = d.register_forward_hook(outer, with_kwargs=True)
    h2 = d.condition_embedder.register_forward_pre_hook(lambda m, a: inner_calls.append(len(seen)))
    try:
        _run(wan.with_patch(_fixed()), tiny_wan_request(steps=2, cfg=1.0))
    finally:
        h.remove()
        h2.remove()
    assert inner_calls == [0]  # only step 0 computed
    (x0, y0), (x1, y1) = seen
    c = y0.shape[1]
    expected = (x1[:, :c].float() + (y0.float() - x0[:, :c].float())).to(y1.dtype)
    assert torch.equal(y1, expected)


# ----------------------------------------------------------------------------------------------- state per run
def test_state_does_not_leak_between_runs_or_seeds(wan):
    patch = StepCachePatch(method="easycache", threshold=5.0, start_percent=0.0, end_percent=1.0)
    model = wan.with_patch(patch)
    a = _run(model, tiny_wan_request(steps=6, seed=1))
    counts_a = patch.last_counts
    b = _run(model, tiny_wan_request(steps=6, seed=2))
    again = _run(model, tiny_wan_request(steps=6, seed=1))
    assert torch.equal(a, again), "a second run with the same seed must not see the first run's cache"
    fresh = _run(wan.with_patch(StepCachePatch(method="easycache", threshold=5.0, start_percent=0.0,
                                                end_percent=1.0)), tiny_wan_request(steps=6, seed=2))
    assert torch.equal(b, fresh)
    assert counts_a == patch.last_counts and counts_a["transformer"][1] > 0


def test_two_experts_keep_their_own_state_reset_at_the_switch(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan22-i2v-a14b")
    patch = _fixed()
    log = StepLog(model)
    try:
        _run(model.with_patch(patch), tiny_wan_request(steps=10, cfg=3.5), log)
    finally:
        log.close()
    high, low = log.computed_steps("transformer"), log.computed_steps("transformer_2")
    assert high and low
    switch = min(s for s in range(10) if s > max(high) or s in low)
    # Each expert computes its own first step and then every other step; the low-noise expert does not reuse the
    # high-noise expert's last result.
    assert low[0] == switch
    assert high == list(range(0, switch, 2))
    assert low == list(range(switch, 10, 2))
    counts = patch.last_counts
    assert counts["transformer"][0] + counts["transformer"][1] == switch
    assert sum(counts["transformer_2"]) == 10 - switch
    assert "transformer_2:" in patch_note(patch)


# ----------------------------------------------------------------------------------------------- stream + CFG batching
def test_stream_a_skipped_step_loads_no_block_and_cfg_batching_serves_both_branches(wan_stream):
    req = tiny_wan_request(steps=6)
    plain = _run(wan_stream, req)
    log = StepLog(wan_stream)
    batcher = wan_stream.loaded.placement.cfg_batchers[0]
    try:
        patch = _fixed()
        cached = _run(wan_stream.with_patch(patch), req, log)
    finally:
        log.close()
    assert log.computed_steps() == [0, 2, 4]
    # One batch-2 forward per computed step (cond and uncond together), none on skipped steps.
    assert all(n == 1 for n in log.computed["transformer"].values())
    for step in (1, 3, 5):
        assert log.loads[step] == 0 and log.block_runs[step] == 0, f"skipped step {step}: {log.loads} {log.block_runs}"
    n_blocks = len(wan_stream.loaded.pipe.transformer.blocks)
    assert all(log.block_runs[s] == n_blocks for s in (0, 2, 4)), log.block_runs
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    assert wan_stream.loaded.placement.cfg_batched and batcher.stats["served"] > 0
    assert "CFG batched" in patch_note(patch)


def test_composes_with_token_merge(wan_stream):
    req = tiny_wan_request(steps=4)
    plain = _run(wan_stream, req)
    merged = wan_stream.with_patch(TokenMergePatch(ratio=0.5, start_percent=0.0))
    only_merge = _run(merged, req)
    both = merged.with_patch(_fixed())
    out = _run(both, req)
    assert torch.isfinite(out).all() and not torch.equal(out, only_merge) and not torch.equal(out, plain)
    assert both.patches[-1].last_counts == {"transformer": (2, 2)}
    assert torch.equal(_run(wan_stream, req), plain)


@pytest.mark.parametrize(
    "mode,dtype,method,expected",
    [(OffloadMode.MODEL, "bf16", "fixed", (3, 3)), (OffloadMode.GROUP, "bf16", "teacache", (4, 2)),
     (OffloadMode.SEQUENTIAL, "bf16", "teacache", (4, 2)), (OffloadMode.STREAM, "bf16", "teacache", (4, 2)),
     (OffloadMode.STREAM, "fp8_e4m3fn", "teacache", (4, 2)), (OffloadMode.GROUP, "bf16", "easycache", None)],
)
def test_composes_with_every_offload_mode(tiny_models_root, mode, dtype, method, expected):
    """The wrapper sits outside accelerate's / diffusers' offload hooks; TeaCache's time embedding is computed
    wherever those hooks keep the time embedder (teacache always computes the first and the last step)."""
    model = load_tiny(tiny_models_root / WAN, mode, dtype)
    before = _forwards(model)
    patch = StepCachePatch(method=method, threshold=10.0, start_percent=0.0, end_percent=1.0,
                           max_consecutive_skips=1)
    out = _run(model.with_patch(patch), tiny_wan_request(steps=6))
    assert torch.isfinite(out).all()
    if expected is not None:
        assert patch.last_counts == {"transformer": expected}
    else:
        assert sum(patch.last_counts["transformer"]) == 6
    assert _forwards(model) == before


# ----------------------------------------------------------------------------------------------- cancel and OOM
class _ChecksPerStep(Recorder):
    """Counts the cancel checks made during each step (denoiser calls, and blocks of computed forwards)."""

    def __init__(self, cancel_at=None) -> None:
        super().__init__(cancel_at)
        self.per_step: list[int] = []
        self._seen = 0

    def on_step(self, step, total, latents) -> None:
        self.per_step.append(self.checks - self._seen)
        self._seen = self.checks
        super().on_step(step, total, latents)


def test_cancel_checks_every_call_including_skipped_ones_and_leaves_nothing(wan):
    req = tiny_wan_request(steps=6)
    before = _forwards(wan)
    rec = _ChecksPerStep(cancel_at=3)
    with pytest.raises(Cancelled):
        generate(wan.with_patch(_fixed()), req, rec)
    # Step 1 was skipped: its cond and uncond calls still passed the cancel check (and ran no block).
    assert len(rec.per_step) == 3 and rec.per_step[1] == 2
    assert rec.per_step[2] > 2  # a computed step also checks inside its blocks
    assert _forwards(wan) == before
    patch = _fixed()
    full = _run(wan.with_patch(patch), req)
    assert torch.equal(full, _run(wan.with_patch(_fixed()), req))
    assert patch.last_counts == {"transformer": (3, 3)}


def test_oom_step_down_retries_with_fresh_state(wan):
    req = tiny_wan_request(steps=6)
    patch = _fixed()
    model = wan.with_patch(patch)
    expected = _run(wan.with_patch(_fixed()), req)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    handle = wan.loaded.pipe.transformer.condition_embedder.register_forward_pre_hook(boom)
    plans = []
    try:
        out = planner.run_with_step_down(lambda: _run(model, req), lambda: planner.PLANS[0], plans.append,
                                         lambda: None)
    finally:
        handle.remove()
    assert len(plans) == 1, "the fake OOM should have caused one step-down"
    assert torch.equal(out, expected)
    assert patch.last_counts == {"transformer": (3, 3)}


# ----------------------------------------------------------------------------------------------- calibrated rules
def test_teacache_and_magcache_run_on_wan21_with_their_published_retention(wan):
    req = tiny_wan_request(steps=10)
    for method in ("teacache", "magcache"):
        patch = StepCachePatch(method=method, threshold=10.0, start_percent=0.0, end_percent=1.0)
        log = StepLog(wan)
        try:
            _run(wan.with_patch(patch), req, log)
        finally:
            log.close()
        computed = log.computed_steps()
        if method == "teacache":
            assert 0 in computed and 9 in computed  # first and last step always computed
        else:
            assert {0, 1} <= set(computed)  # first 20% always computed (retention 0.2)
        assert patch.last_counts["transformer"][1] > 0
        assert "480P calibration" in patch_note(patch)


def test_magcache_ratios_take_the_nearest_calibrated_step():
    ratios = MAGCACHE_RATIOS["480P"]
    assert len(ratios) == 80
    forty = ratios_for_steps(ratios, 40)
    assert forty[1] == (ratios[2], ratios[3]) and forty[-1] == (ratios[-2], ratios[-1])
    twenty = ratios_for_steps(ratios, 20)
    assert len(twenty) == 20 and twenty[0] == (1.0, 1.0) and twenty[-1] == forty[-1]


def test_magcache_skips_while_the_accumulated_error_stays_under_the_threshold():
    view = lambda s: StepView(s, 40, torch.zeros(1), None, torch.nn.Identity())  # noqa: E731
    rule = MagCacheRule(0.12, MAGCACHE_RATIOS["480P"])
    # Steps 30, 31, 32 of 40: cond ratios 0.97056, 0.96588, 0.96113 -> running errors 0.029, 0.092, 0.191.
    assert [rule.propose(view(s), True) for s in (30, 31, 32)] == [True, True, False]
    rule.computed(view(32), torch.zeros(1))
    assert rule.propose(view(33), True) is True  # a computed step restarts the error
    assert rule.propose(view(34), False) is False


def test_easycache_rule_computes_once_the_predicted_change_adds_up():
    rule = EasyCacheRule(threshold=0.3, subsample=1)
    x = torch.zeros(1, 4, 2, 4, 4)
    view = lambda s, x: StepView(s, 10, x, None, torch.nn.Identity())  # noqa: E731
    out0 = torch.ones(1, 4, 2, 4, 4)
    rule.computed(view(0, x), out0)
    x1 = x + 0.1
    rule.computed(view(1, x1), out0 + 0.1)  # k = 0.1 / 0.1 = 1, |out| ~ 1.1
    decisions = [rule.propose(view(s, x1 + 0.1 * (s - 1)), True) for s in (2, 3, 4)]
    # estimates: 0.1/1.1, 0.2/1.1, 0.3/1.1 -> sums 0.09, 0.27, 0.55
    assert decisions == [True, True, False]
    assert rule.propose(view(5, x1), False) is False  # never skips an ineligible step


def test_teacache_polynomial_is_the_official_one(wan):
    d = wan.loaded.pipe.transformer
    rule = TeaCacheRule(0.19, TEACACHE_COEFFICIENTS["480P"])
    assert rule.propose(StepView(0, 10, torch.zeros(1), torch.tensor([999.0]), d), True) is False
    rule.propose(StepView(1, 10, torch.zeros(1), torch.tensor([900.0]), d), True)
    import numpy as np

    assert len(rule.distances) == 1 and np.isfinite(rule.distances[0])
    assert TEACACHE_COEFFICIENTS["480P"][0] == pytest.approx(-302.331670)


# ----------------------------------------------------------------------------------------------- refusals
def test_i2vgenxl_is_refused_with_the_fix(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-i2vgenxl")
    with pytest.raises(InputError, match="remove the Step Cache node") as e:
        generate(model.with_patch(StepCachePatch()), tiny_wan_request(steps=1, cfg=1.0, width=64, height=64,
                                                                      num_frames=4))
    assert e.value.input_name == "model"


@pytest.mark.parametrize("folder", ["tiny-wan22-i2v-a14b", "tiny-easyanimate-v51-inp"])
def test_calibrated_methods_are_refused_outside_wan21_i2v(tiny_models_root, folder):
    model = load_tiny(tiny_models_root / folder)
    for method in ("teacache", "magcache"):
        with pytest.raises(InputError, match="pick method easycache") as e:
            StepCachePatch(method=method).attach(model, model.family.run_info(model.loaded, tiny_wan_request()))
        assert e.value.input_name == "method"
    assert all("forward" not in d.__dict__ for d in model.loaded.denoisers), "a refusal left a wrapper behind"


@pytest.mark.parametrize(
    "kw,name",
    [(dict(method="tea"), "method"), (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
     (dict(max_consecutive_skips=0), "max_consecutive_skips")],
)
def test_bad_settings_name_the_input(kw, name):
    with pytest.raises(InputError) as e:
        StepCachePatch(**kw)
    assert e.value.input_name == name


def test_easyanimate_runs_with_its_own_batch_two_cfg(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-easyanimate-v51-inp")
    req = tiny_wan_request(steps=4, num_frames=5)
    plain = _run(model, req)
    patch = _fixed()
    out = _run(model.with_patch(patch), req)
    assert patch.last_counts == {"transformer": (2, 2)}
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert torch.equal(_run(model.with_patch(StepCachePatch(threshold=0)), req), plain)


@pytest.mark.parametrize("folder", ["tiny-wan21-flf2v", "tiny-wan22-ti2v-5b"])
def test_other_wan_variants_run_a_fixed_schedule(tiny_models_root, folder):
    """FLF2V (an end frame) and TI2V-5B (per-token timesteps, 48 latent channels in and out)."""
    model = load_tiny(tiny_models_root / folder)
    patch = _fixed()
    req = tiny_wan_request(steps=4)
    if model.family.supports_end_image:
        req = tiny_wan_request(steps=4, end_image=req.image)
    out = _run(model.with_patch(patch), req)
    assert patch.last_counts == {"transformer": (2, 2)} and torch.isfinite(out).all()


def test_calibration_follows_the_model_name_then_the_run_size():
    from types import SimpleNamespace

    from vramwise.step_cache.patch import wan21_variant

    def model(folder):
        return SimpleNamespace(loaded=SimpleNamespace(options=SimpleNamespace(folder=folder)))

    small, large = SimpleNamespace(width=832, height=480), SimpleNamespace(width=1280, height=720)
    assert wan21_variant(model("models/Wan2.1-I2V-14B-720P-Diffusers"), small)[0] == "720P"
    assert wan21_variant(model("wan2.1_i2v_480p_14B_bf16.safetensors"), large)[0] == "480P"
    assert wan21_variant(model("my-wan"), large) == ("720P", "from the run size (the model name says neither 480P nor 720P)")
    assert wan21_variant(model("my-wan"), small)[0] == "480P"
