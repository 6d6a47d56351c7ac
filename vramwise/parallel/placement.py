"""Resident or streamed ranks: each GPU holds the whole denoiser when it fits, else every rank streams.

The weight size comes from the safetensors headers (no tensor is read). Activations per rank shrink with the
rank count (each rank holds 1/N of the video tokens), but the weights do not: Ulysses replicates them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

# bytes per element of the safetensors dtype names
_ELEMENT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_size(path: Path) -> tuple[int, int]:
    """(elements, bytes) of the tensors in one .safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    elements = nbytes = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for d in entry["shape"]:
            count *= int(d)
        elements += count
        nbytes += count * _ELEMENT.get(entry["dtype"], 2)
    return elements, nbytes


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
