"""Turning a ComfyUI IMAGE tensor into integer frames a chunk at a time.

The clip tensor is usually the biggest thing in RAM (81 x 720p float32 is 900 MB), so nothing here may build a
second copy of it: output order is a list of indices (pingpong included) and only ``chunk_size`` frames are ever
converted to integers at once.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np
import torch

from .errors import InputError

# NTSC-style rates: users type 23.976 or 29.97 and mean n*1000/1001, which players and editors expect exactly.
_NTSC_BASES = (24, 30, 48, 60, 120)


def as_frames(images: Any) -> torch.Tensor:
    """A [F,H,W,C] view (C in 3..4) of a ComfyUI IMAGE, a single [H,W,C] image or a numpy array; never copies."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(
            "images", f"expected an IMAGE tensor, got {type(images).__name__}.", "connect an IMAGE output."
        )
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise InputError(
            "images",
            f"expected shape [frames, height, width, 3 or 4], got {list(images.shape)}.",
            "connect an IMAGE output (RGB or RGBA).",
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(
            "images", f"the clip is empty (shape {list(images.shape)}).", "connect a non-empty IMAGE batch."
        )
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise InputError("images", f"unsupported dtype {images.dtype}.", "pass float images in 0..1 (or uint8).")
    return images


def to_fraction(fps: float | int | str | Fraction) -> Fraction:
    """Exact frame rate: 23.976 -> 24000/1001, "30000/1001" kept, 12.5 -> 25/2."""
    try:
        rate = Fraction(fps.strip() if isinstance(fps, str) else fps) if isinstance(fps, (str, Fraction, int)) else None
        value = float(rate if rate is not None else fps)
    except (ValueError, ZeroDivisionError, TypeError):
        raise InputError("frame_rate", f"'{fps}' is not a number.", "enter a frame rate such as 16 or 24.") from None
    if not math.isfinite(value) or not 0.01 <= value <= 1000:
        raise InputError("frame_rate", f"{fps} is out of range.", "use a frame rate between 0.01 and 1000.")
    if rate is not None and rate.denominator <= 1001:
        return rate
    for base in _NTSC_BASES:
        ntsc = Fraction(base * 1000, 1001)
        if abs(value - float(ntsc)) < 0.0015:
            return ntsc
    return Fraction(value).limit_denominator(1000)


def frame_order(count: int, pingpong: bool) -> list[int]:
    """Source index of every output frame; pingpong adds the way back without repeating either end."""
    order = list(range(count))
    if pingpong:
        order += range(count - 2, 0, -1)  # empty for 1 or 2 frames: 2F-2 frames in every case but F=1
    return order


def padded_size(height: int, width: int, factors: tuple[int, int]) -> tuple[int, int]:
    fx, fy = factors
    return -(-height // fy) * fy, -(-width // fx) * fx


def convert(
    frames: torch.Tensor,
    indices: Sequence[int],
    height: int,
    width: int,
    bits: int = 8,
    out: np.ndarray | None = None,
    scratch: torch.Tensor | None = None,
) -> np.ndarray:
    """[k, height, width, 3] uint8 (bits=8) or uint16 (bits=16) RGB for the given source frames.

    Works one frame at a time through one float scratch frame, so the temporaries stay a single frame whatever
    the chunk. ``out``/``scratch`` let a caller reuse buffers across chunks (fresh large buffers cost a page
    fault per 4 KiB on every use). Frames smaller than (height, width) are padded by repeating the last
    row/column: black or cropped borders would show up as a line at the edge of the picture.
    """
    src_h, src_w = int(frames.shape[1]), int(frames.shape[2])
    top = 255 if bits == 8 else 65535
    dtype = np.uint8 if bits == 8 else np.uint16
    if out is None:
        out = np.empty((len(indices), height, width, 3), dtype=dtype)
    elif out.shape != (len(indices), height, width, 3) or out.dtype != dtype:
        raise ValueError(
            f"out must be {dtype.__name__} {(len(indices), height, width, 3)}, got {out.dtype} {out.shape}"
        )
    out_t = torch.from_numpy(out)
    on_cpu = frames.device.type == "cpu"
    if frames.dtype != torch.uint8 and scratch is None:
        scratch = torch.empty((src_h, src_w, 3), device=frames.device)
    half = torch.tensor(0.5)
    for j, i in enumerate(indices):
        frame = frames[i, :, :, :3]
        target = out_t[j, :src_h, :src_w]
        if frames.dtype == torch.uint8:
            target.copy_(frame if bits == 8 else frame.to(torch.int32) * 257)
        else:
            torch.add(half, frame, alpha=top, out=scratch)  # frame * top + 0.5 in one pass, widening halves
            # NaN from a broken VAE decode would otherwise become an arbitrary integer.
            torch.nan_to_num_(scratch, nan=0.0).clamp_(0.0, top)
            # The truncating cast after + 0.5 rounds half up. On a GPU, cast there so only integers cross the bus.
            target.copy_(scratch if on_cpu else scratch.to(out_t.dtype))
        if width > src_w:
            out[j, :src_h, src_w:] = out[j, :src_h, src_w - 1 : src_w]
        if height > src_h:
            out[j, src_h:] = out[j, src_h - 1 : src_h]
    return out


def iter_chunks(
    frames: torch.Tensor, order: Sequence[int], chunk_size: int, height: int, width: int, bits: int = 8
) -> Iterator[np.ndarray]:
    """Converted frames in output order, ``chunk_size`` at a time.

    Every chunk is written into the same buffer, so a yielded array is only valid until the next one is
    requested: encoders copy it into codec frames right away, and holding one chunk (not two) is the point.
    """
    step = max(1, int(chunk_size))
    dtype = np.uint8 if bits == 8 else np.uint16
    buffer = np.empty((min(step, len(order)), height, width, 3), dtype=dtype)
    scratch = None
    if frames.dtype != torch.uint8:
        scratch = torch.empty((int(frames.shape[1]), int(frames.shape[2]), 3), device=frames.device)
    for start in range(0, len(order), step):
        indices = order[start : start + step]
        yield convert(frames, indices, height, width, bits, out=buffer[: len(indices)], scratch=scratch)
        release_free_heap()


@cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Encoders allocate and free a few MB per frame (PyAV frames, libwebp's ARGB copies). glibc serves such
    sizes from the heap once one has been freed, and the small allocations the encoder keeps (its compressed
    output) pin the freed space, so RSS grew by a frame per frame: 81 frames of 720p WebP peaked 140-310 MB
    above the clip, 60-90 MB with a trim per chunk. A trim costs well under a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
