"""A sampling run under the memory planner: check the plan against the real request, step down on OOM."""

from __future__ import annotations

from typing import Callable

from ..device import host_available_bytes
from ..families.base import GenerationRequest
from ..handles import VramwiseLatent, VramwiseModel
from ..loader import CACHE, PipelineCache
from ..offload import OffloadMode
from ..sampling import SamplingObserver, generate
from . import planner


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
        est = planner.plan_of(loaded.pipe) if loaded.pipe is not None else None
        if est is not None:
            return est.plan
        return planner.Plan(loaded.options.offload_mode.value, fp8=loaded.options.weight_dtype.value.startswith("fp8"))

    def free_all() -> None:
        cache.release_all()
        free_others()

    def step_down(plan: planner.Plan) -> None:
        planner.set_floor(key, plan)
        if not loaded.released:
            free_all()
        cache.revive(loaded, before_load=free_others)

    def describe() -> str:
        run = loaded.family.run_info(loaded, request)
        shape = planner.RunShape(run.latent_frames, run.latent_height, run.latent_width, run.do_cfg)
        comp = planner.components_of(loaded.pipe, loaded.family.denoiser_names)
        est = planner.estimate(current_plan(), comp, shape)
        if auto and loaded.device.type == "cuda":
            budget = planner.vram_budget(loaded.device, vram_budget_gb or None, headroom_gb)
            if est.vram_peak > budget:
                better = planner.choose(comp, shape, budget, host_available_bytes(), planner.PLANS.index(est.plan))
                if better.plan != est.plan:
                    report.append(f"plan '{est.plan.describe()}' would need ~{est.vram_peak / 2**30:.1f} GiB "
                                  f"(budget {budget / 2**30:.1f} GiB): switched to '{better.plan.describe()}'")
                    step_down(better.plan)
                    est = better
        return ("auto " if auto else "") + est.describe()

    report.append(describe())
    if not auto:
        return generate(model, request, observer), report
    latent = planner.run_with_step_down(
        lambda: generate(model, request, observer), current_plan, step_down, free_all, report
    )
    return latent, report
