"""Check generation inputs against a family's rules before any weights move, with fixes that name values."""

from __future__ import annotations

from .errors import InputError
from .families.base import Family


def _nearest_multiples(value: int, multiple: int) -> tuple[int, int]:
    below = max(multiple, (value // multiple) * multiple)
    return below, below + multiple


def validate_generation(
    family: Family,
    *,
    width: int,
    height: int,
    num_frames: int,
    steps: int,
    cfg: float,
    has_end_image: bool = False,
) -> None:
    """Raise InputError for the first input the family cannot use."""
    if steps < 1:
        raise InputError("steps", f"must be at least 1 (got {steps}).", f"set steps to 1 or more ({family.label} default: {family.defaults.steps}).")
    m = family.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value < m or value % m:
            lo, hi = _nearest_multiples(value, m)
            raise InputError(
                name,
                f"{value} is not a multiple of {m}, which {family.label} needs.",
                f"use {lo} or {hi}.",
            )
    if not family.frames_valid(num_frames):
        lo, hi = family.valid_frames_near(num_frames)
        f = family.temporal_factor
        raise InputError(
            "num_frames",
            f"{num_frames} frames is not of the form {f}k+1, which {family.label} needs.",
            f"use {lo} or {hi}.",
        )
    if num_frames > family.max_frames:
        raise InputError("num_frames", f"{num_frames} is more than {family.label} supports.", f"use at most {family.max_frames}.")
    if cfg < 0:
        raise InputError("cfg", f"must not be negative (got {cfg}).", f"use 1.0 to disable guidance or the default {family.defaults.cfg}.")
    if has_end_image and not family.supports_end_image:
        raise InputError(
            "end_image",
            f"{family.label} cannot take an end frame.",
            "disconnect end_image, or load a model that takes one (Wan2.1 FLF2V, Wan2.2 A14B, EasyAnimate V5.1 InP).",
        )
