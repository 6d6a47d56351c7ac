"""MagCache rule for Wan2.1 I2V 14B (480P / 720P), with the official calibrated magnitude ratios.

Facts from Zehong-Ma/MagCache ``MagCache4Wan2.1/magcache_generate.py`` (read, not copied): each step multiplies
a running ratio by that step's calibrated magnitude ratio and adds |1 - running ratio| to a running error; the
step is skipped while the error stays under the threshold (and at most K steps in a row: here the node's
``max_consecutive_skips``); a computed step restarts both. The first ``retention_ratio`` of the steps are always
computed. The decision depends on the step index only, so it costs nothing at run time. The ratios are kept per
CFG branch (cond, uncond); a step is skipped only when both branches agree, because one decision serves the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .published import MAGCACHE_RETENTION
from .rule import StepView


def ratios_for_steps(interleaved: tuple[float, ...], steps: int) -> list[tuple[float, float]]:
    """(cond, uncond) ratio of each of ``steps`` steps, taking the nearest calibrated step (the official rule)."""
    cond, uncond = interleaved[0::2], interleaved[1::2]
    n = len(cond)
    if steps == 1:
        return [(cond[-1], uncond[-1])]
    scale = (n - 1) / (steps - 1)
    picks = [int(round(i * scale)) for i in range(steps)]
    return [(cond[i], uncond[i]) for i in picks]


@dataclass
class MagCacheRule:
    threshold: float
    interleaved: tuple[float, ...]
    retention: float = MAGCACHE_RETENTION
    _ratios: list[tuple[float, float]] | None = field(default=None, repr=False)
    _ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    _error: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def always_compute(self, step: int, total: int) -> bool:
        return step < int(total * self.retention)

    def propose(self, view: StepView, eligible: bool) -> bool:
        if not eligible:
            return False
        if self._ratios is None or len(self._ratios) != view.total:
            self._ratios = ratios_for_steps(self.interleaved, view.total)
        for b, r in enumerate(self._ratios[min(view.step, view.total - 1)]):
            self._ratio[b] *= r
            self._error[b] += abs(1.0 - self._ratio[b])
        return max(self._error) < self.threshold

    def computed(self, view: StepView, output: torch.Tensor) -> None:
        self._ratio = [1.0, 1.0]
        self._error = [0.0, 0.0]
