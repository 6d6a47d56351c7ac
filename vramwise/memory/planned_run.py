"""A sampling run under the memory planner: check the plan against the real request, step down on OOM."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from ..device import is_oom
from ..families.base import GenerationRequest
from ..handles import VramwiseLatent, VramwiseModel
from ..loader import CACHE, PipelineCache
from ..offload import OffloadMode
from ..sampling import SamplingObserver, generate
from . import planner

log = logging.getLogger(__name__)


def drop_scheduler_state(pipe, to: torch.device = torch.device("cpu")) -> None:
    """Move the scheduler's per-run tensors (multistep schedulers keep the last model outputs and sample, the
    size of the latents each) off the GPU, so nothing of a finished, failed or cancelled run stays there.
    The next run's ``set_timesteps`` rebuilds them."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return
    for name, value in list(vars(scheduler).items()):
        if isinstance(value, torch.Tensor) and value.device != to:
            setattr(scheduler, name, value.to(to))
        elif isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.device != to for v in value):
            setattr(scheduler, name, [v.to(to) if isinstance(v, torch.Tensor) else v for v in value])


class _EncoderOOM(Exception):
    """Out of memory while a text encoder was running (it is retried with the text encoder on the CPU)."""


class _EncoderWatch:
    """Knows whether a text encoder forward was running when an exception went through (no post-hook then)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.running = 0
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self.running += 1

    def _leave(self, module, args, output) -> None:
        self.running -= 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _dit_token_merge(model: VramwiseModel):
    """The model's active token-merge patch when it acts on a video DiT (the planner's concern), else None."""
    from ..token_merge import TokenMergePatch, merge_method

    for patch in model.patches:
        if isinstance(patch, TokenMergePatch) and patch.ratio > 0 and model.loaded.pipe is not None:
            if any(merge_method(d) == "dit" for d in model.loaded.denoisers):
                return patch
    return None


def generate_with_plan(
    model: VramwiseModel,
    request: GenerationRequest,
    observer: SamplingObserver,
    vram_budget_gb: float = 0.0,
    headroom_gb: float = 1.0,
    free_others: Callable[[], None] = lambda: None,
    cache: PipelineCache = CACHE,
) -> tuple[VramwiseLatent, list[str]]:
    """Sample with the model's plan and return the latents plus what the planner said and did.

    With offload mode ``auto`` the plan chosen at load time (for a default-sized clip) is re-checked against this
    request and the budget, and a CUDA OOM frees everything, reloads with the next safer plan and retries.
    ``free_others`` unloads models that are not ours (ComfyUI's) before a reload.
    """
    loaded = model.loaded
    auto = loaded.options.offload_mode is OffloadMode.AUTO
    key = planner.key_of(loaded.pipe)
    report: list[str] = []

    def current_plan() -> planner.Plan:
        est = loaded.placement.plan if loaded.pipe is not None else None
        if est is not None:
            return est.plan
        return planner.Plan(loaded.options.offload_mode.value, fp8=loaded.options.weight_dtype.value.startswith("fp8"))

    def free_all() -> None:
        cache.release_all()
        free_others()

    def revive() -> None:
        cache.revive(loaded, before_load=free_others)  # carries the placement's compile choice over

    def step_down(plan: planner.Plan) -> None:
        planner.set_floor(key, plan)
        if not loaded.released:
            free_all()
        revive()

    def describe() -> str:
        nonlocal model
        run = loaded.family.run_info(loaded, request)
        merging = _dit_token_merge(model)
        shape = planner.RunShape(run.latent_frames, run.latent_height, run.latent_width, run.do_cfg,
                                 merging is not None)
        streamed = {id(st.module) for st in loaded.placement.leaf_streamers}
        comp = planner.on_host(planner.components_of(loaded.pipe, loaded.family.denoiser_names), loaded.device,
                               [n for n in loaded.family.text_encoder_names
                                if id(getattr(loaded.pipe, n, None)) in streamed])
        compiled = loaded.placement.compiled
        est = planner.estimate(current_plan(), comp, shape, compiled)
        if auto and loaded.device.type == "cuda":
            budget = planner.vram_budget(loaded.device, vram_budget_gb or None, headroom_gb)
            why = planner.token_merge_conflict(est.plan, comp, shape, budget, compiled)
            if why:
                report.append(why)
                log.warning(why)
                model = dataclasses.replace(model, patches=tuple(p for p in model.patches if p is not merging))
                shape = dataclasses.replace(shape, token_merge=False)
                est = planner.estimate(est.plan, comp, shape, compiled)
            if est.vram_peak > budget:
                # The model is loaded already: MemAvailable no longer counts what it holds (planner.host_budget).
                host = planner.host_budget(loaded.options.host_ram_budget_gb,
                                           held=planner.held_bytes(loaded.pipe, loaded.family.denoiser_names))
                better = planner.choose(comp, shape, budget, host, planner.PLANS.index(est.plan))
                if better.plan != est.plan:
                    report.append(f"plan '{est.plan.describe()}' would need ~{est.vram_peak / 2**30:.1f} GiB "
                                  f"(budget {budget / 2**30:.1f} GiB): switched to '{better.plan.describe()}'")
                    step_down(better.plan)
                    est = better
        return ("auto " if auto else "") + est.describe()

    def encoders() -> list[torch.nn.Module]:
        pipe = loaded.pipe
        return [m for m in (getattr(pipe, n, None) for n in loaded.family.text_encoder_names)
                if isinstance(m, torch.nn.Module)]

    def run_once():
        watch = _EncoderWatch(encoders()) if not loaded.options.text_encoder_on_cpu else None
        try:
            return generate(model, request, observer)
        except Exception as e:  # noqa: BLE001 - only an OOM inside the text encoder is turned into a retry
            if watch is not None and watch.running > 0 and is_oom(e):
                raise _EncoderOOM() from e
            raise
        finally:
            if watch is not None:
                watch.remove()
            if loaded.pipe is not None:
                drop_scheduler_state(loaded.pipe)

    def attempt():
        while True:
            try:
                return run_once()
            except _EncoderOOM:
                # Text encoding ran out of memory: reload with the text encoder on the CPU and run again.
                report.append("out of memory in the text encoder: moved it to the CPU and retried")
                log.warning("text encoder out of memory; retrying with the text encoder on the CPU")
                free_all()
                loaded.options = dataclasses.replace(loaded.options, text_encoder_on_cpu=True)
                if not loaded.released:
                    loaded.placement.release()
                    loaded.released = True
                    loaded.pipe = None
                revive()

    report.append(describe())
    if not auto:
        return attempt(), report
    latent = planner.run_with_step_down(attempt, current_plan, step_down, free_all, report)
    return latent, report
