"""TeaCache rule for Wan2.1 I2V 14B (480P / 720P), with the official calibrated polynomial.

Facts from ali-vilab/TeaCache ``TeaCache4Wan2.1/teacache_generate.py`` (read, not copied): the input is the
timestep embedding ``e`` (time embedder output, float32); the relative L1 change of ``e`` against the previous
step, mapped through the polynomial, is added to a running sum; a step is skipped while the sum stays under the
threshold, and the sum restarts at every computed step. The first and the last step are always computed.

How ``e`` is had without running block 0: it depends on the timestep only, so this rule runs just the condition
embedder's sinusoidal projection and its time-embedding MLP (256 -> dim -> dim, ~27M weights at 14B), never the
text/image embedders or a block. Under ``stream`` the condition embedder is a transient module whose weights sit
in host memory between forwards, so the MLP runs there, on the CPU (a few ms), and no block is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .rule import StepView


def wan_time_embedding(denoiser: torch.nn.Module, timestep: torch.Tensor) -> torch.Tensor:
    """Wan's ``temb`` for ``timestep`` (float32, on the CPU), computed where the time embedder's weights are."""
    emb = denoiser.condition_embedder
    mlp = emb.time_embedder
    weight = next(iter(mlp.parameters()))
    # meta: accelerate's sequential offload keeps the weights in its hooks and moves inputs itself.
    device = weight.device if weight.device.type != "meta" else timestep.device
    dtype = weight.dtype if weight.dtype.is_floating_point and weight.element_size() > 1 else torch.bfloat16
    t = timestep.reshape(-1)[:1].to(device)
    with torch.no_grad():
        proj = emb.timesteps_proj(t).to(dtype)
        return mlp(proj).float().cpu()


def has_wan_time_embedder(denoiser: torch.nn.Module) -> bool:
    emb = getattr(denoiser, "condition_embedder", None)
    return emb is not None and hasattr(emb, "time_embedder") and hasattr(emb, "timesteps_proj")


@dataclass
class TeaCacheRule:
    threshold: float
    coefficients: tuple[float, ...]
    _poly: np.poly1d = field(init=False, repr=False)
    _prev: torch.Tensor | None = field(default=None, repr=False)
    _accumulated: float = 0.0
    distances: list[float] = field(default_factory=list)  # rescaled distance per step, for tests and logs

    def __post_init__(self) -> None:
        self._poly = np.poly1d(self.coefficients)

    def always_compute(self, step: int, total: int) -> bool:
        return step == 0 or step >= total - 1

    def propose(self, view: StepView, eligible: bool) -> bool:
        e = wan_time_embedding(view.denoiser, view.timestep)
        prev, self._prev = self._prev, e
        if prev is None:
            return False
        rel = float((e - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        distance = float(self._poly(rel))
        self.distances.append(distance)
        self._accumulated += distance
        return eligible and self._accumulated < self.threshold

    def computed(self, view: StepView, output: torch.Tensor) -> None:
        self._accumulated = 0.0
