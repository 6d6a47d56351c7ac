"""What a step-cache rule sees and answers: one decision per denoising step of one denoiser (expert)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class StepView:
    """The first denoiser call of a step: its latent input and timestep (the CFG pair shares both)."""

    step: int
    total: int
    hidden_states: torch.Tensor
    timestep: Any
    denoiser: torch.nn.Module


class Rule(Protocol):
    """Decides whether a step may reuse the cached result. A fresh instance serves one expert for one run."""

    def always_compute(self, step: int, total: int) -> bool:
        """Steps the rule itself never skips (its published retention), on top of the user's window."""
        ...

    def propose(self, view: StepView, eligible: bool) -> bool:
        """Update the rule's running estimate with this step; True to skip. Only an ``eligible`` step (inside the
        window, below the consecutive-skip limit, a cached result present) may be skipped."""
        ...

    def computed(self, view: StepView, output: torch.Tensor) -> None:
        """The step ran: ``output`` is the first call's result (the cond branch)."""
        ...


def latent_part(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The channels of the input that the output predicts (Wan I2V's input is latents + 20 condition channels,
    the output 16), or None when the shapes do not line up that way."""
    if x.dim() != like.dim() or x.shape[0] != like.shape[0] or x.shape[2:] != like.shape[2:]:
        return None
    if x.shape[1] < like.shape[1]:
        return None
    return x[:, : like.shape[1]]
