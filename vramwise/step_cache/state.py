"""The decision state of one denoiser (one expert) for one run: its rule, the cached result of each CFG branch,
the consecutive-skip count and what was computed and skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .rule import Rule, StepView, latent_part


@dataclass
class Cached:
    """One branch's reusable result: the residual ``output - input latents`` (EasyCache-style: a skipped step adds
    it to the new input), or the output itself when the output does not line up with the input."""

    value: torch.Tensor
    residual: bool
    dtype: torch.dtype
    batch: int
    kind: str  # "tensor", "tuple" (return_dict=False) or "output" (an output class with ``.sample``)
    rest: tuple[Any, ...] = ()  # further tuple items of the output, returned unchanged
    wrapper: type | None = None


def sample_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def remember(x: torch.Tensor, out: Any) -> Cached | None:
    """What a computed call leaves for the next skipped one; None for an output this cache cannot rebuild."""
    sample = sample_of(out)
    if sample is None:
        return None
    if isinstance(out, torch.Tensor):
        kind, rest, wrapper = "tensor", (), None
    elif isinstance(out, (tuple, list)):
        kind, rest, wrapper = "tuple", tuple(out[1:]), None
    else:
        kind, rest, wrapper = "output", (), type(out)
    part = latent_part(x, sample)
    with torch.no_grad():
        value = sample.float() - part.float() if part is not None else sample.detach().clone()
    return Cached(value, part is not None, sample.dtype, sample.shape[0], kind, rest, wrapper)


def replay(cached: Cached, x: torch.Tensor) -> Any | None:
    """The output a skipped call returns, shaped like the computed call's; None when the input does not fit."""
    if x.shape[0] != cached.batch:
        return None
    if cached.residual:
        part = latent_part(x, cached.value)
        if part is None:
            return None
        with torch.no_grad():
            sample = (part.float() + cached.value).to(cached.dtype)
    else:
        sample = cached.value
    if cached.kind == "tensor":
        return sample
    if cached.kind == "tuple":
        return (sample, *cached.rest)
    return cached.wrapper(sample=sample)


@dataclass
class ExpertState:
    """Per-expert state; replaced by a fresh one at the Wan2.2 expert switch and for every run."""

    name: str
    rule: Rule
    cached: dict[int, Cached] = field(default_factory=dict)
    consecutive: int = 0
    step: int | None = None
    branch: int = -1
    skipping: bool = False
    view: StepView | None = None
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)

    def begin_step(self, view: StepView, in_window: bool, max_consecutive: int) -> bool:
        self.step, self.branch, self.view = view.step, -1, view
        eligible = (
            in_window
            and 0 in self.cached
            and self.consecutive < max_consecutive
            and not self.rule.always_compute(view.step, view.total)
        )
        self.skipping = bool(self.rule.propose(view, eligible)) and eligible
        if self.skipping:
            self.consecutive += 1
            self.skipped_steps.append(view.step)
        else:
            self.consecutive = 0
            self.computed_steps.append(view.step)
        return self.skipping
