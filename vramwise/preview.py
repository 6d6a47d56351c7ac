"""Cheap RGB previews of latents during sampling: a per-channel linear map, no VAE involved."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


def latent_preview(
    latents: torch.Tensor,
    factors: Sequence[Sequence[float]],
    bias: Sequence[float] | None = None,
    max_size: int = 512,
) -> Image.Image | None:
    """An RGB picture of the middle latent frame of [B, C, F, h, w] (or [B, C, h, w]) latents.

    Returns None when the factors do not fit the latent's channels (e.g. an unknown family).
    """
    x = latents[0].detach().float().cpu()
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    weight = torch.tensor(factors, dtype=torch.float32)
    if x.ndim != 3 or weight.shape[0] != x.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->hwr", x, weight)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
    image = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), mode="RGB")
    scale = max_size / max(image.size)
    # Latents are 8-16x smaller than the video; upscale so the preview is readable on the node.
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST)
