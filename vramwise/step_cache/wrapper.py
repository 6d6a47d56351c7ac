"""The whole-step denoiser wrapper and the per-run coordinator.

Why a wrapper around the denoiser's whole forward instead of diffusers' cache hooks
(``FirstBlockCacheConfig`` / ``MagCacheConfig`` in ``diffusers.hooks``): those hook the transformer blocks, need a
``cache_context`` around every call and decide from block 0's output, so block 0 always runs. Under ``stream``
running block 0 means fetching it over PCIe (~0.7 GiB at 14B) and the lean stream forward replaces the block loop
the hooks sit on; TeaCache is not in diffusers at all. Wrapping the whole forward, outermost (outside
``offload.cfg_batching.CfgBatcher``), a skipped call returns before anything inside runs: no embedder, no block,
no stream fetch. Forward pre-hooks (the sampler's cancel check, the stream engine's activation) still run on every
call, because they live in ``Module.__call__`` around this wrapper.

CFG: the pipeline calls the denoiser once per branch with the same latents and timestep (cond first). The first
call of a step decides for every call of that step; each call position (branch) keeps its own cached result. With
CFG batching the cond call computes both branches and the batcher serves the uncond call from its own cache; both
calls still pass through here, so both results are remembered. A pipeline that batches CFG itself (EasyAnimate)
makes one batch-2 call, cached as one.

What is reused: the residual of the whole forward (output minus the latent channels of the input), as ComfyUI's
EasyCache does. The official TeaCache / MagCache code reuses the residual of the block stack and still runs the
embedders and the output head; here only their decision rules are taken, so a skipped step runs nothing at all.

Wan2.2 A14B: one state per expert; when the step's denoiser changes, both are replaced by fresh states, so the
first step of the new expert is computed and nothing of the other expert is reused.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch

from .rule import Rule, StepView
from .state import ExpertState, remember, replay, sample_of

log = logging.getLogger(__name__)


def in_window(step: int, total: int, start: float, end: float) -> bool:
    """Whether step ``step`` (0-based) of ``total`` may be skipped at all."""
    return total > 0 and start <= step / total < end


class _ForwardWrapper:
    """Puts ``run.call`` in front of one module's forward for one run; ``detach`` puts back what was there."""

    def __init__(self, module: torch.nn.Module, run: "CacheRun") -> None:
        self.module = module
        self.run = run
        self._sig = inspect.signature(type(module).forward)
        self._had = "forward" in module.__dict__
        self._previous = module.__dict__.get("forward")
        self.inner = module.forward
        self.active = True

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return self.inner(*args, **kwargs)
            return self.run.call(self, args, kwargs)

        self.forward = forward
        module.forward = forward

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        try:
            return dict(self._sig.bind(self.module, *args, **kwargs).arguments)
        except TypeError:
            return None

    def detach(self) -> None:
        self.active = False
        if self.module.__dict__.get("forward") is self.forward:
            if self._had:
                self.module.forward = self._previous
            else:
                del self.module.forward
        else:  # something wrapped over us meanwhile: stay as an inert pass-through rather than cut it off
            log.warning("step cache: %s.forward was replaced during the run", type(self.module).__name__)


class CacheRun:
    """The step cache of one sampling run: one wrapper and one decision state per denoiser."""

    def __init__(
        self,
        denoisers: list[tuple[str, torch.nn.Module]],
        make_rule: Callable[[], Rule],
        total: int,
        start: float,
        end: float,
        max_consecutive: int,
    ) -> None:
        self.make_rule = make_rule
        self.total = total
        self.start, self.end = start, end
        self.max_consecutive = max_consecutive
        self.step = 0
        self.names = {id(m): n for n, m in denoisers}
        self.log: dict[str, tuple[list[int], list[int]]] = {n: ([], []) for n, _ in denoisers}
        self.states = {id(m): self._fresh(n) for n, m in denoisers}
        self.last: int | None = None
        self.switches = 0
        self.wrappers: list[_ForwardWrapper] = []
        try:
            for _, m in denoisers:
                self.wrappers.append(_ForwardWrapper(m, self))
        except BaseException:
            self.detach()
            raise

    def _fresh(self, name: str) -> ExpertState:
        computed, skipped = self.log[name]
        return ExpertState(name, self.make_rule(), computed_steps=computed, skipped_steps=skipped)

    def on_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def call(self, wrapper: _ForwardWrapper, args: tuple, kwargs: dict) -> Any:
        call = wrapper.bind(args, kwargs)
        x = call.get("hidden_states") if call is not None else None
        if not isinstance(x, torch.Tensor):
            return wrapper.inner(*args, **kwargs)
        key = id(wrapper.module)
        state = self.states[key]
        if state.step != self.step:
            if self.last is not None and self.last != key:
                # Expert switch (Wan2.2 A14B): nothing carries over from one expert's steps to the other's.
                self.switches += 1
                for k in self.states:
                    self.states[k] = self._fresh(self.names[k])
                state = self.states[key]
            self.last = key
            view = StepView(self.step, self.total, x, call.get("timestep"), wrapper.module)
            state.begin_step(view, in_window(self.step, self.total, self.start, self.end), self.max_consecutive)
        state.branch += 1
        branch = state.branch
        if state.skipping:
            cached = state.cached.get(branch)
            out = replay(cached, x) if cached is not None else None
            if out is not None:
                return out
        out = wrapper.inner(*args, **kwargs)
        cached = remember(x, out)
        if cached is not None:
            state.cached[branch] = cached
        if branch == 0 and not state.skipping and state.view is not None:
            sample = sample_of(out)
            if sample is not None:
                state.rule.computed(state.view, sample)
        return out

    def detach(self) -> None:
        for w in reversed(self.wrappers):
            w.detach()
        self.wrappers.clear()
        for k in self.states:
            self.states[k].cached.clear()

    def counts(self) -> dict[str, tuple[int, int]]:
        """Steps computed and skipped per denoiser name (only denoisers that ran)."""
        return {n: (len(c), len(s)) for n, (c, s) in self.log.items() if c or s}
