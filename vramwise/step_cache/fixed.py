"""``fixed``: skip every step the window and the consecutive-skip limit allow (tests and the benchmark).

With ``max_consecutive_skips`` 1 and the window 0..1 this computes every other step: exactly half of a run.
It says nothing about quality; it makes the cache's mechanics measurable on random weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rule import StepView


@dataclass
class FixedRule:
    def always_compute(self, step: int, total: int) -> bool:
        return False

    def propose(self, view: StepView, eligible: bool) -> bool:
        return eligible

    def computed(self, view: StepView, output: torch.Tensor) -> None:
        pass
