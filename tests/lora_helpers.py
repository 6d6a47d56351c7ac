"""Shared pieces of the LoRA tests: tiny LoRA files of every layout and diffusers' own fused reference."""

from __future__ import annotations

from pathlib import Path

import torch

import tiny_loras
from engine_helpers import load_tiny
from vramwise.handles import VramwiseModel
from vramwise.lora import LoraEntry, with_lora


def tiny_lora(model: VramwiseModel, folder: Path, layout: str, name: str | None = None, **kw) -> Path:
    """A random LoRA in ``layout`` for the model's first denoiser, written to ``folder``."""
    return tiny_loras.write_lora(model.loaded.pipe.transformer, folder / (name or f"{layout}.safetensors"), layout, **kw)


def as_fp32(model: VramwiseModel) -> VramwiseModel:
    """Run the denoisers in fp32, so fused and unfused LoRA agree to float32 rounding (see the tolerances)."""
    for d in model.loaded.denoisers:
        d.to(torch.float32)
    return model


def diffusers_fused(folder: Path, loras: list[tuple[Path, float]], fp32: bool = False,
                    transformer_2: bool = False) -> VramwiseModel:
    """A fresh tiny model with the LoRAs put in by diffusers itself: ``load_lora_weights`` + ``fuse_lora``
    (PEFT merge). ``transformer_2``: load into Wan2.2's low-noise expert instead of the high-noise one."""
    model = load_tiny(folder)
    if fp32:
        as_fp32(model)
    pipe = model.loaded.pipe
    names = []
    for i, (path, strength) in enumerate(loras):
        name = f"l{i}"
        pipe.load_lora_weights(str(path), adapter_name=name, load_into_transformer_2=transformer_2)
        names.append(name)
    component = "transformer_2" if transformer_2 else "transformer"
    pipe.set_adapters(names, [s for _, s in loras])
    pipe.fuse_lora(components=[component], lora_scale=1.0, adapter_names=names)
    return model


def lora_model(model: VramwiseModel, *entries: tuple[Path, float]) -> VramwiseModel:
    """``model`` with LoRA entries chained as the LoRA nodes chain them."""
    for path, strength in entries:
        model = with_lora(model, LoraEntry(path, strength, strength))
    return model
