"""The sampler's scheduler choice for flow-matching families (Wan), built from the pipeline's own config.

``default`` keeps the pipeline's scheduler (UniPC for Wan), with the run's shift as before. The others are what
the step/CFG-distill recipes use:
- ``flow_euler``: ``FlowMatchEulerDiscreteScheduler`` with the same static shift (sigma' = s*sigma/(1+(s-1)*sigma)).
- ``dpm++``: ``DPMSolverMultistepScheduler`` (2nd-order dpmsolver++) on flow sigmas with ``flow_shift``.
- ``lcm``: x0 prediction re-noised to the next sigma each step, i.e. ``FlowMatchEulerDiscreteScheduler`` with
  ``stochastic_sampling=True``. diffusers' ``LCMScheduler`` does not serve: it only knows epsilon / sample / v
  prediction on DDPM betas, not flow matching.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import InputError

SCHEDULERS = ("default", "flow_euler", "dpm++", "lcm")


def build_scheduler(name: str, base: Any, shift: float) -> Any:
    """A new scheduler ``name`` for a flow-matching pipeline whose original scheduler is ``base``."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    config = dict(base.config)
    shift = float(shift)
    if name == "default":
        if "flow_shift" in config:
            return type(base).from_config(config, flow_shift=shift)
        return type(base).from_config(config)
    if name in ("flow_euler", "lcm"):
        # UniPC's flow keys (flow_shift, use_flow_sigmas, prediction_type) mean nothing here; dropped, not warned.
        known = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
        config = {k: v for k, v in config.items() if k in known or k.startswith("_")}
        return FlowMatchEulerDiscreteScheduler.from_config(
            config, shift=shift, use_dynamic_shifting=False, stochastic_sampling=(name == "lcm"))
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
            algorithm_type="dpmsolver++", solver_order=2)
    raise InputError("scheduler", f"'{name}' is not a scheduler.", f"pick one of {', '.join(SCHEDULERS)}.")
