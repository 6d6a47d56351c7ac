"""EasyCache-style rule (model-agnostic, no calibration): predict the output change from the input change.

Facts from ComfyUI 0.3.75 ``comfy_extras/nodes_easycache.py`` (read, not copied): between two computed steps the
ratio k = mean|output change| / mean|input change| (the "transformation rate") is roughly constant, so the output
change of a skipped step is estimated as k * mean|input change| / mean|last output|; these estimates are summed over
the skipped steps and a step is computed once the sum reaches the threshold. Inputs and outputs are compared on a
spatially subsampled view (every 8th row and column) so the check costs almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .published import EASYCACHE_SUBSAMPLE
from .rule import StepView, latent_part


def _sub(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x[..., ::factor, ::factor].float() if factor > 1 else x.float()


@dataclass
class EasyCacheRule:
    threshold: float
    subsample: int = EASYCACHE_SUBSAMPLE
    # state of the last computed step
    _x_prev: torch.Tensor | None = field(default=None, repr=False)
    _out_prev: torch.Tensor | None = field(default=None, repr=False)
    _out_norm: float | None = None
    _rate: float | None = None  # k: output change per unit of input change
    _channels: int | None = None
    _cumulative: float = 0.0
    estimates: list[float] = field(default_factory=list)  # the per-step estimates, for tests and logs

    def always_compute(self, step: int, total: int) -> bool:
        return False

    def _input(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._channels is None:
            return None
        return _sub(x[:, : self._channels], self.subsample)

    def propose(self, view: StepView, eligible: bool) -> bool:
        if not eligible or self._rate is None or self._x_prev is None or not self._out_norm:
            return False
        x = self._input(view.hidden_states)
        if x is None or x.shape != self._x_prev.shape:
            return False
        change = float((x - self._x_prev).abs().mean())
        estimate = self._rate * change / self._out_norm
        self.estimates.append(estimate)
        self._cumulative += estimate
        return self._cumulative < self.threshold

    def computed(self, view: StepView, output: torch.Tensor) -> None:
        part = latent_part(view.hidden_states, output)
        if part is None:
            return
        self._channels = output.shape[1]
        x = _sub(part, self.subsample)
        out = _sub(output, self.subsample)
        if self._x_prev is not None and self._out_prev is not None and self._x_prev.shape == x.shape:
            input_change = float((x - self._x_prev).abs().mean())
            if input_change > 0:
                self._rate = float((out - self._out_prev).abs().mean()) / input_change
        self._x_prev, self._out_prev = x, out
        self._out_norm = float(output.float().abs().mean())
        self._cumulative = 0.0
