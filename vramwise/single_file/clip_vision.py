"""CLIP vision encoder (Wan2.1 I2V/FLF2V: ViT-H/14) from ComfyUI's ``clip_vision_h.safetensors``.

Comfy's file is in transformers' layout (``vision_model.*`` plus ``visual_projection.weight``, which
CLIPVisionModel does not use). Files in OpenCLIP layout (``visual.transformer...``) are refused with a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .build import materialize
from .detect import shipped_config
from .reader import Header, load_tensors, read_header, weight_names

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


_PREFIX = "vision_model."


def _short(header: Header) -> dict[str, str]:
    """{name without 'vision_model.': stored name} (Comfy's file has the prefix; transformers 5 saves without)."""
    return {(n[len(_PREFIX):] if n.startswith(_PREFIX) else n): n for n in weight_names(header) if not n.startswith("visual_projection.")}


def clip_config(header: Header) -> dict[str, Any]:
    t = {s: header.tensors[n] for s, n in _short(header).items()}
    t.update({k: v for k, v in header.tensors.items() if k.startswith("visual_projection.")})
    pe = t.get("embeddings.patch_embedding.weight")
    pos = t.get("embeddings.position_embedding.weight")
    fc1 = t.get("encoder.layers.0.mlp.fc1.weight")
    if pe is None or pos is None or fc1 is None:
        openclip = any(k.startswith("visual.") for k in t)
        raise InputError(
            "clip_vision",
            f"'{header.path.name}' is not a CLIP vision model in transformers layout"
            + (" (it is in OpenCLIP layout)." if openclip else "."),
            "use ComfyUI's clip_vision_h.safetensors (from the Wan 2.1 repackaged files).",
        )
    hidden, patch = pe.shape[0], pe.shape[2]
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    config = dict(shipped_config("clip-vit-h-14.json"))
    config.update(
        hidden_size=hidden, patch_size=patch, image_size=grid * patch, intermediate_size=fc1.shape[0],
        num_hidden_layers=len({k.split(".")[2] for k in t if k.startswith("encoder.layers.")}),
    )
    if "visual_projection.weight" in t:
        config["projection_dim"] = t["visual_projection.weight"].shape[0]
    if hidden != 1280:
        config["num_attention_heads"] = max(1, hidden // 64)
    config.update(header.config_overrides("clip_vision"))
    return config


def load_clip_vision(path: Path, dtype: torch.dtype, image_dim: int | None = None):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    header = read_header(path)
    config = clip_config(header)
    if image_dim is not None and int(config["hidden_size"]) != int(image_dim):
        raise InputError(
            "clip_vision",
            f"'{path.name}' has hidden size {config['hidden_size']}, the diffusion model expects {image_dim}.",
            "use clip_vision_h.safetensors (ViT-H/14), the image encoder Wan2.1 was trained with.",
        )
    cfg = CLIPVisionConfig(**config)
    names = _short(header)
    if any(k.startswith(_PREFIX) for k in CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=0, hidden_size=8, intermediate_size=8, num_attention_heads=1)).state_dict()):
        names = {_PREFIX + k: v for k, v in names.items()}
    state = load_tensors(path, names, dtype)
    model = materialize(lambda: CLIPVisionModel(cfg), state, path, "CLIP vision model")
    size = int(config["image_size"])
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD, resample=3, do_center_crop=True,
    )
    return model, processor
