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
    """A GGUF file (city96-style: original Wan names, F16/F32 plus quantized blocks) via diffusers' GGUF quantizer.

    The tensors are read with diffusers' own ``load_gguf_checkpoint`` and renamed here (the same map as for
    .safetensors: prefixes, and the FLF2V position embedding diffusers' converter leaves out), then handed to
    ``from_single_file`` already in diffusers' names, so it skips its own conversion. Quantized linear weights
    stay quantized (dequantized per layer at compute time, in ``dtype``). Tensors a converter reshaped (recorded
    in ``comfy.gguf.orig_shape.*``, e.g. 5-D patch embeddings) are restored to their real shape, dequantized if
    needed: diffusers' GGUF loader does not read that metadata.
    """
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    header = read_header(path)
    try:
        raw = load_gguf_checkpoint(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFolderError(f"Could not read GGUF '{path.name}': {type(e).__name__}: {e}") from e
    for name in header.reshaped:
        t = raw[name]
        if isinstance(t, GGUFParameter):
            t = dequantize_gguf_tensor(t)
        raw[name] = t.reshape(header.tensors[name].shape).to(dtype)
    names = transformer_name_map(list(raw))
    state = {target: raw[stored] for target, stored in names.items()}
    del raw
    config = dict(info.config)
    from accelerate import init_empty_weights

    with init_empty_weights():
        expected = set(WanTransformer3DModel.from_config(config).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFolderError(
            f"'{path.name}' does not fit a {info.label} transformer: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). It is another model or a damaged file."
        )
    with tempfile.TemporaryDirectory(prefix="vramwise-cfg-") as tmp:
        cfg = dict(config, _class_name="WanTransformer3DModel")
        (Path(tmp) / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        try:
            return WanTransformer3DModel.from_single_file(
                state,
                config=tmp,
                local_files_only=True,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                torch_dtype=dtype,
            ).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelFolderError(f"Could not load GGUF '{path.name}': {type(e).__name__}: {e}") from e


def stored_fp8(path: Path) -> bool:
    """True if the file's weights are stored in fp8 (plain or scaled)."""
    header = read_header(path)
    return any(t.dtype in FP8_DTYPES for t in header.tensors.values())
