"""Read a LoRA file and turn it into diffusers module names with (A, B, scale) plus bias deltas.

The key layouts users have (ComfyUI / original Wan ``diffusion_model.blocks...``, musubi/kohya ``lora_unet_...``,
diffusers/PEFT ``transformer....lora_A``) are converted by diffusers' own ``WanLoraLoaderMixin.lora_state_dict``,
which picks ``_convert_non_diffusers_wan_lora_to_diffusers`` or ``_convert_musubi_wan_lora_to_diffusers``, folds
``.alpha`` into A/B and maps ``.diff_b`` to ``lora_B.bias``. What it drops (norm ``.diff``, lightx2v's ``diff_m``)
is counted here so ``info`` can say how many keys were ignored. Only the module names and tensors are taken from
diffusers; the LoRA is not loaded into PEFT wrappers (they rename the modules and copy each targeted Linear's
state into a new module tree, which breaks the offload hooks and the stream engine's packed views).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LoraLayer:
    """One target Linear: ``W' = W + scale * B @ A`` and ``b' = b + scale * bias`` (scale before strength)."""

    down: torch.Tensor | None  # A [rank, in]
    up: torch.Tensor | None  # B [out, rank]
    bias: torch.Tensor | None  # [out] (the file's .diff_b)
    scale: float = 1.0  # alpha / rank still to apply (PEFT metadata); non-diffusers files have it folded in


@dataclass
class LoraFile:
    """A converted LoRA file: per denoiser module name (diffusers naming, no prefix), what to add."""

    path: Path
    layout: str  # "comfy/original", "musubi/kohya", "diffusers/peft"
    layers: dict[str, LoraLayer]
    source_keys: int  # tensors in the file, alpha scalars not counted
    ignored_keys: int = 0  # file tensors the conversion reads but does not apply
    ignored_examples: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def detect_layout(keys: list[str]) -> str:
    """The layout names diffusers' Wan loader dispatches on (same prefix tests)."""
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfy/original"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi/kohya"
    return "diffusers/peft"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError("lora_name", f"'{path.name}' is not a readable safetensors file ({e}).",
                         "pick a .safetensors LoRA file (download it again if it is truncated).") from e
    return tensors, meta


def _normalise_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI saves Wan LoRAs both with ``diffusion_model.`` and ``model.diffusion_model.``; diffusers' dispatch
    only knows the first."""
    if any(k.startswith("model.diffusion_model.") for k in sd):
        return {k.removeprefix("model."): v for k, v in sd.items()}
    return sd


def _peft_scales(meta: dict[str, str]) -> tuple[float, dict[str, float]] | None:
    """alpha / r from diffusers' PEFT adapter metadata (default, per-module overrides), None without metadata."""
    raw = meta.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    r = float(cfg.get("r", 0) or 0)
    alpha = float(cfg.get("lora_alpha", r) or r)
    if r <= 0:
        return None
    ranks = cfg.get("rank_pattern") or {}
    alphas = cfg.get("alpha_pattern") or {}
    per = {m: float(alphas.get(m, alpha)) / float(ranks.get(m, r)) for m in set(ranks) | set(alphas)}
    return alpha / r, per


def convert_state_dict(sd: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> LoraFile:
    """Convert a LoRA state dict with diffusers' Wan LoRA conversion; raise naming the file when it can't."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    sd = _normalise_prefix(dict(sd))
    layout = detect_layout(list(sd))
    source_keys = sum(1 for k in sd if not k.endswith(".alpha"))
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(dict(sd))
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise InputError(
            "lora_name",
            f"'{path.name}' is not a Wan LoRA that diffusers can convert ({layout} key names; "
            f"{type(e).__name__}: {str(e)[:200]}).",
            "pick a LoRA made for Wan (ComfyUI, musubi/kohya or diffusers naming).",
        ) from e
    scales = _peft_scales(meta or {}) if layout == "diffusers/peft" else None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in converted.items():
        name = key.removeprefix("base_model.model.").removeprefix("transformer.")
        for part, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias")):
            if name.endswith(part):
                layers.setdefault(name[: -len(part)], {})[slot] = tensor
                break
        else:
            unknown.append(key)
    out: dict[str, LoraLayer] = {}
    for module, parts in layers.items():
        scale = 1.0
        if scales is not None:
            scale = scales[1].get(module, scales[0])
        out[module] = LoraLayer(parts.get("down"), parts.get("up"), parts.get("bias"), scale)
    # Each tensor diffusers hands back comes from one tensor of the file, so the difference is what it read but
    # does not apply (norm .diff keys, lightx2v's blocks.N.diff_m, patch_embedding.diff, ...).
    used = sum(len(p) for p in layers.values())
    ignored = max(0, source_keys - used) + len(unknown)
    examples = [k for k in sd if k.endswith((".diff", ".diff_m")) or (k.endswith(".diff_b") and "norm" in k)]
    return LoraFile(path=path, layout=layout, layers=out, source_keys=source_keys, ignored_keys=ignored,
                    ignored_examples=(unknown + examples)[:3])


# ---- cache ------------------------------------------------------------------------------------------------------
_CACHE: dict[tuple, LoraFile] = {}
CACHE_FILES = 3  # converted files kept in RAM (a rank-64 14B LoRA is ~0.7 GB in bf16): a chain of three


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def read_lora(path: Path | str) -> LoraFile:
    """Read and convert ``path`` once; changing a LoRA's strength (or re-running) reuses the converted tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputError("lora_name", f"'{path.name}' does not exist.", "pick a file listed under models/loras.")
    key = _identity(path)
    hit = _CACHE.pop(key, None)
    if hit is None:
        tensors, meta = _read(path)
        if not tensors:
            raise InputError("lora_name", f"'{path.name}' holds no tensors.", "pick a LoRA file with weights.")
        hit = convert_state_dict(tensors, path, meta)
        READS.append(key[0])
    _CACHE[key] = hit
    while len(_CACHE) > CACHE_FILES:
        _CACHE.pop(next(iter(_CACHE)))
    return hit


READS: list[str] = []  # files actually read from disk (tests observe that strength changes do not re-read)


def clear_cache() -> None:
    _CACHE.clear()
