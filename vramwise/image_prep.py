"""Fit ComfyUI IMAGE tensors ([B, H, W, C] float 0..1) to the size a model will generate."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError, parse_choice


class ResizeMode(str, Enum):
    CROP = "crop"  # fill the frame, cut what sticks out (centre)
    PAD = "pad"  # show the whole image, black bars where the aspect differs

    @classmethod
    def parse(cls, value: str) -> "ResizeMode":
        return parse_choice(cls, value, "resize_mode", "resize mode")


def first_frame(image: torch.Tensor | None, input_name: str = "image") -> tuple[torch.Tensor, str | None]:
    """The first image of a batch as [H, W, 3], and a note when a batch was cut to one."""
    if image is None:
        raise InputError(input_name, "no image is connected.", "connect a Load Image (or any IMAGE) node to it.")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] < 1:
        raise InputError(
            input_name,
            f"expected an IMAGE tensor [batch, height, width, channels], got shape {tuple(image.shape)}.",
            "connect an IMAGE output (Load Image, an upscaler, a VAE decode).",
        )
    note = None
    if image.shape[0] > 1:
        n = image.shape[0]
        note = (f"{input_name}: a batch of {n} images was given; the first one is used (to continue a clip from "
                f"its last frame, pick it with Image From Batch, batch_index {n - 1})")
    frame = image[0].float()
    if frame.shape[-1] == 1:
        frame = frame.expand(-1, -1, 3)
    return frame[..., :3], note


def fit_image(frame: torch.Tensor, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """Resize ``frame`` ([H, W, 3] float 0..1) to exactly width x height by centre crop or padding."""
    h, w = frame.shape[0], frame.shape[1]
    if mode is ResizeMode.CROP:
        scale = max(width / w, height / h)
    else:
        scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    x = frame.permute(2, 0, 1).unsqueeze(0)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0.0, 1.0)
    if mode is ResizeMode.CROP:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    else:
        canvas = torch.zeros((1, 3, height, width), dtype=x.dtype)
        top, left = (height - new_h) // 2, (width - new_w) // 2
        canvas[:, :, top : top + new_h, left : left + new_w] = x
        x = canvas
    array = (x[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")
