"""Resident or streamed ranks: each GPU holds the whole denoiser when it fits, else every rank streams.

The weight size comes from the safetensors headers (no tensor is read). Activations per rank shrink with the
rank count (each rank holds 1/N of the video tokens), but the weights do not: Ulysses replicates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..memory.estimates import safetensors_tensors


def safetensors_size(path: Path) -> tuple[int, int]:
    """(elements, bytes) of the tensors in one .safetensors file, from its JSON header."""
    sizes = safetensors_tensors(path).values()
    return sum(n for n, _ in sizes), sum(b for _, b in sizes)


def denoiser_bytes(folder: Path | str, names: Iterable[str], dtype_bytes: int | None = None) -> int:
    """Weight bytes of the named denoiser sub-folders, summed (every rank loads every expert): as stored, or
    at ``dtype_bytes`` per element (the precision they are loaded in)."""
    total = 0
    for name in names:
        for path in sorted((Path(folder) / name).glob("*.safetensors")):
            elements, nbytes = safetensors_size(path)
            total += nbytes if dtype_bytes is None else elements * dtype_bytes
    return total


def choose_placement(weight_bytes: int, free_per_gpu: list[int], activation_bytes_per_gpu: int = 0,
                     headroom_bytes: int = 2 * 2**30) -> str:
    """"resident" when every GPU fits the weights plus its activations and headroom, else "stream"."""
    need = weight_bytes + activation_bytes_per_gpu + headroom_bytes
    return "resident" if free_per_gpu and all(free >= need for free in free_per_gpu) else "stream"
