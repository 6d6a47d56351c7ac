"""Sampling observers for engine tests: record progress, cancel on a chosen step."""

from __future__ import annotations

import torch


class Cancelled(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


class Recorder:
    """Records every step report (and latent shape) and every cancel check; raises Cancelled at ``cancel_at``."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.steps: list[tuple[int, int]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.checks = 0
        self.cancel_at = cancel_at

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        self.steps.append((step, total))
        self.shapes.append(tuple(latents.shape))
        if self.cancel_at is not None and step >= self.cancel_at:
            raise Cancelled(f"cancelled at step {step}")

    def check_cancel(self) -> None:
        self.checks += 1
