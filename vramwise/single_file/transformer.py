"""The Wan denoiser from a single file (.safetensors: bf16/fp16/fp8/fp8_scaled; .gguf: quantized)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..errors import ModelFolderError
from ..precision import DENOISER_FP8_SKIP
from .build import keep_fp32_patterns, keeps_fp32, materialize
from .detect import ArchInfo
from .keys import transformer_name_map
from .reader import FP8_DTYPES, matches_any, read_header, weight_names


def load_transformer(path: Path, info: ArchInfo, dtype: torch.dtype, keep_fp8: bool = False):
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if info.is_gguf:
        return _load_gguf(path, info, dtype)
    header = read_header(path)
    names = transformer_name_map(weight_names(header))
    patterns = keep_fp32_patterns(WanTransformer3DModel)
    from .reader import load_tensors

    state = load_tensors(
        path,
        names,
        dtype,
        keep_fp32=lambda n: keeps_fp32(n, patterns, dtype),
        keep_fp8=lambda n: keep_fp8 and not matches_any(n, DENOISER_FP8_SKIP),
    )
    config = {k: v for k, v in info.config.items()}
    return materialize(lambda: WanTransformer3DModel.from_config(config), state, path, f"{info.label} transformer")


def _load_gguf(path: Path, info: ArchInfo, dtype: torch.dtype):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    with tempfile.TemporaryDirectory(prefix="vramwise-cfg-") as tmp:
        cfg = dict(info.config, _class_name="WanTransformer3DModel")
        (Path(tmp) / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        try:
            return WanTransformer3DModel.from_single_file(
                str(path),
                config=tmp,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                torch_dtype=dtype,
            ).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelFolderError(f"Could not load GGUF '{path.name}': {type(e).__name__}: {e}") from e


def stored_fp8(path: Path) -> bool:
    """True if the file's weights are stored in fp8 (plain or scaled)."""
    header = read_header(path)
    return any(t.dtype in FP8_DTYPES for t in header.tensors.values())
