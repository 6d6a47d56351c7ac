"""Reading single files without a full load: headers, metadata, and per-tensor loading in the target dtype.

Host memory: every tensor is read in its stored dtype and converted on its own before the next one is read,
so loading never holds a second (let alone fp32) copy of the whole file.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ModelFolderError
from .scaled_fp8 import SCALE_SUFFIX, fold_scale, is_scale_key

# safetensors dtype names -> torch dtypes (header only).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# GGUF tensor types stored as plain floats; quantized types (Q8_0, Q4_K, ...) have no torch dtype (None).
_GGUF_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GGUF_ORIG_SHAPE = "comfy.gguf.orig_shape."
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The file metadata key holding constants shapes cannot reveal (JSON object); written by tools for small
# non-standard models (the tests' tiny files), never needed for the published checkpoints.
CONFIG_METADATA_KEY = "vramwise_config"


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype | None
    shape: tuple[int, ...]


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    kind: str  # "safetensors" | "gguf"
    # GGUF only: tensors stored in another shape than their real one (``comfy.gguf.orig_shape.*`` metadata);
    # ``tensors`` holds the real shapes.
    reshaped: tuple[str, ...] = ()

    def config_overrides(self, component: str) -> dict:
        raw = self.metadata.get(CONFIG_METADATA_KEY)
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"'{self.path.name}': metadata '{CONFIG_METADATA_KEY}' is not JSON ({e}).") from e
        return dict(data.get(component, {}))


def _corrupt(path: Path, why: str) -> ModelFolderError:
    return ModelFolderError(
        f"'{path.name}' is not a readable model file ({why}). It is probably truncated or corrupt: "
        "download it again and compare its size with the published one."
    )


def read_header(path: Path) -> Header:
    """Tensor names, dtypes and shapes of a .safetensors or .gguf file, without reading any weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"Model file '{path}' does not exist.")
    if path.suffix.lower() == ".gguf":
        return _read_gguf_header(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _corrupt(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 200 * 2**20):
                raise _corrupt(path, "bad safetensors header length")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON: {e}") from e
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, info in header.items():
        start, end = info.get("data_offsets", (0, 0))
        if end > data_len:
            raise _corrupt(path, f"tensor '{name}' lies past the end of the file ({end} > {data_len} bytes of data)")
        tensors[name] = TensorInfo(_ST_DTYPES.get(info.get("dtype")), tuple(info.get("shape", ())))
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, "safetensors")


def _read_gguf_header(path: Path) -> Header:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelFolderError(
            f"'{path.name}' is a GGUF file, which needs the 'gguf' Python package: pip install gguf"
        ) from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises assorted errors on damaged files
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    metadata: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for key, fld in reader.fields.items():
        try:
            value = fld.contents()
        except Exception:  # a field this gguf version cannot decode: not one we need
            continue
        if key.startswith(GGUF_ORIG_SHAPE):
            # Converters that reshape a tensor (e.g. 5-D patch embeddings, rows that do not fit quant blocks)
            # record its real shape here.
            orig_shapes[key[len(GGUF_ORIG_SHAPE):]] = tuple(int(x) for x in value)
        elif isinstance(value, str):
            metadata[key] = value
    tensors = {}
    for t in reader.tensors:
        # GGUF stores shapes innermost-first.
        shape = orig_shapes.get(t.name) or tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[t.name] = TensorInfo(_GGUF_DTYPES.get(t.tensor_type.name), shape)
    reshaped = tuple(n for n in orig_shapes if n in tensors)
    return Header(path, tensors, metadata, "gguf", reshaped)


def strip_prefix(names: Iterable[str], prefixes: tuple[str, ...]) -> dict[str, str]:
    """{name without the first matching prefix: stored name}."""
    out = {}
    for name in names:
        short = name
        for p in prefixes:
            if name.startswith(p):
                short = name[len(p):]
                break
        out[short] = name
    return out


def load_tensors(
    path: Path,
    mapping: dict[str, str],
    dtype: torch.dtype,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    keep_fp8: Callable[[str], bool] = lambda name: False,
) -> dict[str, torch.Tensor]:
    """{target name: tensor} for ``mapping`` {target name: stored name}, converted per tensor.

    Scaled fp8 weights get their ``scale_weight`` folded in. ``keep_fp8(name)``: leave a plain fp8 tensor in
    fp8 (the caller stores weights in fp8 anyway); ``keep_fp32(name)``: convert to fp32 instead of ``dtype``.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for target, name in mapping.items():
                t = f.get_tensor(name)
                scale_key = name[: -len(".weight")] + SCALE_SUFFIX if name.endswith(".weight") else None
                want = torch.float32 if keep_fp32(target) else dtype
                if scale_key is not None and scale_key in stored:
                    t = fold_scale(t, f.get_tensor(scale_key), want)
                elif t.dtype in FP8_DTYPES and keep_fp8(target):
                    pass
                elif t.is_floating_point() and t.dtype != want:
                    t = t.to(want)
                out[target] = t
    except (OSError, RuntimeError) as e:
        raise _corrupt(Path(path), f"{type(e).__name__}: {e}") from e
    except Exception as e:  # safetensors raises its own SafetensorError on damaged data
        if type(e).__name__ == "SafetensorError":
            raise _corrupt(Path(path), str(e)) from e
        raise
    return out


def weight_names(header: Header) -> list[str]:
    """Tensor names that are weights (no fp8 scale bookkeeping, no embedded tokenizer)."""
    return [k for k in header.tensors if not is_scale_key(k) and k != "spiece_model"]


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)
