"""A Wan2.1 I2V folder whose transformer is hundreds of MiB (the tiny model's other parts), for host-memory tests.

The transformer is the tiny builder's architecture made wider and deeper; it is saved in shards, as published
models are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

MEDIUM = dict(num_attention_heads=4, attention_head_dim=128, ffn_dim=2048, num_layers=32)


def build_medium_wan21_i2v(tiny_folder: Path, folder: Path, shard: str = "64MB", **sizes) -> Path:
    """``tiny_folder`` with its transformer replaced by a wider one (random bf16 weights, sharded safetensors)."""
    from diffusers import WanTransformer3DModel

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("transformer"))
    config = WanTransformer3DModel.load_config(tiny_folder / "transformer")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(MEDIUM, **sizes)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("added_kv_proj_dim"):
        config["added_kv_proj_dim"] = inner
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = WanTransformer3DModel.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size=shard)
    return folder
