"""Shared pieces of the engine tests: tiny pictures, requests and models, and sampling observers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vramwise.families.base import GenerationRequest
from vramwise.handles import VramwiseModel
from vramwise.image_prep import ResizeMode, fit_image
from vramwise.loader import LoadOptions, load_pipeline
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB picture, the same for the same seed."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def load_tiny(folder: Path, mode: OffloadMode | str = "none", dtype: WeightDtype | str = "bf16",
              text_on_cpu: bool = False) -> VramwiseModel:
    """A tiny model folder loaded on the CPU as the loader node would."""
    options = LoadOptions(folder, OffloadMode(mode), WeightDtype(dtype), text_encoder_on_cpu=text_on_cpu)
    return VramwiseModel(load_pipeline(options, torch.device("cpu")))


def tiny_wan_request(**overrides) -> GenerationRequest:
    """A 64x64, 5-frame, 2-step request on a fixed random picture (the tiny Wan models' size)."""
    gen = torch.Generator().manual_seed(0)
    image = fit_image(torch.rand(48, 64, 3, generator=gen), 64, 64, ResizeMode.CROP)
    base = dict(image=image, prompt="a ball rolls", negative_prompt="", width=64, height=64, num_frames=5,
                steps=2, cfg=5.0, seed=3, shift=3.0)
    return GenerationRequest(**{**base, **overrides})


def tiny_request(prompt: str, **overrides) -> GenerationRequest:
    """A 64x64, 5-frame, 2-step, cfg 5 request on picture 0 with a negative prompt (the tiny EasyAnimate /
    I2VGen-XL size); ``overrides`` replace any field."""
    base = dict(image=picture(64, 64, 0), prompt=prompt, negative_prompt="blurry, static", width=64, height=64,
                num_frames=5, steps=2, cfg=5.0, seed=0, shift=1.0, end_image=None)
    return GenerationRequest(**{**base, **overrides})


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
