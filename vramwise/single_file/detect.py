"""What a Wan single file is, from tensor names and shapes in its header (no weights are read).

Dimensions, layer counts and channel counts come from shapes; only constants shapes cannot reveal (head size,
RoPE length, eps) come from the shipped JSON config of the matching published architecture, or - for small
non-standard files such as the tests' - from the file's ``vramwise_config`` metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError
from .keys import COMFY_PREFIXES
from .reader import Header, read_header, strip_prefix, weight_names

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# family ids (vramwise.families.wan) by architecture
FAMILY_BY_ARCH = {
    "wan2.1-i2v": "wan2.1-i2v",
    "wan2.1-flf2v": "wan2.1-flf2v",
    "wan2.2-i2v-a14b-expert": "wan2.2-i2v-a14b",
    "wan2.2-ti2v-5b": "wan2.2-ti2v-5b",
}
_CONFIG_FILE = {
    "wan2.1-i2v": "wan2.1-i2v-14b.json",
    "wan2.1-flf2v": "wan2.1-flf2v-14b.json",
    "wan2.2-i2v-a14b-expert": "wan2.2-i2v-a14b-expert.json",
    "wan2.2-ti2v-5b": "wan2.2-ti2v-5b.json",
}
_SIZE_BY_DIM = {1536: "1.3B", 3072: "5B", 5120: "14B"}
# Constants taken from the JSON (or file metadata); everything else is derived from shapes.
_CONSTANTS = ("attention_head_dim", "rope_max_seq_len", "eps", "qk_norm")


@lru_cache(maxsize=None)
def shipped_config(filename: str) -> dict[str, Any]:
    with open(CONFIG_DIR / filename, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


@dataclass(frozen=True)
class ArchInfo:
    arch: str  # key of FAMILY_BY_ARCH
    label: str  # what users call it, e.g. "Wan2.1 I2V 14B"
    family_id: str
    config: dict[str, Any] = field(hash=False, compare=False)
    prefix: str = ""
    is_gguf: bool = False

    @property
    def text_dim(self) -> int:
        return int(self.config["text_dim"])

    @property
    def needs_clip(self) -> bool:
        return self.config.get("image_dim") is not None


def _shape(names: dict[str, str], header: Header, key: str) -> tuple[int, ...] | None:
    stored = names.get(key)
    return header.tensors[stored].shape if stored is not None else None


def detect_transformer(path: Path) -> ArchInfo:
    """The architecture of a Wan diffusion-model file, or a ModelFolderError saying what it is instead."""
    path = Path(path)
    header = read_header(path)
    names = strip_prefix(weight_names(header), COMFY_PREFIXES)
    prefix = next((p for p in COMFY_PREFIXES if any(k.startswith(p) for k in header.tensors)), "")
    pe = _shape(names, header, "patch_embedding.weight")
    if pe is None or len(pe) != 5:
        hint = ""
        if any(k.startswith(("encoder.block.", "shared.")) for k in names):
            hint = " It looks like a text encoder: pick it in 'text_encoder'."
        elif any(k.startswith("vision_model.") for k in names):
            hint = " It looks like a CLIP vision model: pick it in 'clip_vision'."
        elif any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.conv1.", "encoder.conv_in.")) for k in names):
            hint = " It looks like a VAE: pick it in 'vae'."
        raise ModelFolderError(
            f"'{path.name}' is not a Wan diffusion model (no 5-D patch_embedding.weight among {len(names)} tensors).{hint}"
        )
    dim, in_ch = pe[0], pe[1]
    patch = list(pe[2:])
    layers = len({k.split(".")[1] for k in names if k.startswith("blocks.")})
    has_img = any(k.startswith("img_emb.") for k in names)
    flf = "img_emb.emb_pos" in names
    size = _SIZE_BY_DIM.get(dim, f"{dim}-dim")
    if in_ch == 16 and not has_img:
        raise ModelFolderError(
            f"'{path.name}' is a Wan text-to-video model (T2V {size}: 16 input channels, no image branch). "
            "This pack runs image-to-video models: use a Wan2.1 I2V/FLF2V, Wan2.2 I2V-A14B or Wan2.2 TI2V-5B file."
        )
    if in_ch == 36 and has_img:
        arch = "wan2.1-flf2v" if flf else "wan2.1-i2v"
    elif in_ch == 36:
        arch = "wan2.2-i2v-a14b-expert"
    elif in_ch == 48 and not has_img:
        arch = "wan2.2-ti2v-5b"
    else:
        raise ModelFolderError(
            f"'{path.name}' is a Wan model this pack does not know ({size}, {in_ch} input channels, "
            f"{'with' if has_img else 'without'} a CLIP image branch, {layers} layers; likely VACE, Fun or a "
            "fine-tune with another layout). Supported: Wan2.1 I2V/FLF2V 14B, Wan2.2 I2V-A14B experts, Wan2.2 TI2V-5B."
        )
    config = dict(shipped_config(_CONFIG_FILE[arch]))
    head = _shape(names, header, "head.head.weight")
    text = _shape(names, header, "text_embedding.0.weight")
    time = _shape(names, header, "time_embedding.0.weight")
    ffn = _shape(names, header, "blocks.0.ffn.0.weight")
    if head is None or text is None or time is None or ffn is None or layers == 0:
        raise ModelFolderError(f"'{path.name}' lacks tensors every Wan model has (head, embeddings or blocks): corrupt or cut down.")
    derived: dict[str, Any] = {
        "patch_size": patch,
        "in_channels": in_ch,
        "out_channels": head[0] // (patch[0] * patch[1] * patch[2]),
        "text_dim": text[1],
        "freq_dim": time[1],
        "ffn_dim": ffn[0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm3.weight" in names,
        "image_dim": _shape(names, header, "img_emb.proj.0.weight")[0] if has_img else None,
        "added_kv_proj_dim": dim if "blocks.0.cross_attn.k_img.weight" in names else None,
        "pos_embed_seq_len": _shape(names, header, "img_emb.emb_pos")[1] if flf else None,
    }
    config.update(derived)
    overrides = header.config_overrides("transformer")
    for k in _CONSTANTS:
        if k in overrides:
            config[k] = overrides[k]
    head_dim = int(config["attention_head_dim"])
    if dim % head_dim:
        raise ModelFolderError(
            f"'{path.name}': width {dim} is not a multiple of the head size {head_dim}; this is not a published Wan size."
        )
    config["num_attention_heads"] = dim // head_dim
    label = _label(arch) if dim in _SIZE_BY_DIM else f"{_label(arch)} layout ({size})"
    if header.kind == "gguf":
        label += " GGUF"
    return ArchInfo(arch, label, FAMILY_BY_ARCH[arch], config, prefix, header.kind == "gguf")


def _label(arch: str) -> str:
    with open(CONFIG_DIR / _CONFIG_FILE[arch], encoding="utf-8") as f:
        return str(json.load(f).get("_label", arch))
