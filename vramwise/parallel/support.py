"""Which models and settings can run on several GPUs; clear refusals for the rest (input ``gpus``)."""

from __future__ import annotations

from typing import Any

from ..errors import InputError


def check_family(family: Any, gpus: int) -> None:
    """InputError unless ``gpus`` is 1 or the family declares a context-parallel plan for its denoiser."""
    if gpus < 1:
        raise InputError("gpus", f"{gpus} is not a number of GPUs.", "use 1 (one GPU) or more.")
    if gpus == 1:
        return
    if not getattr(family, "supports_context_parallel", False):
        raise InputError(
            "gpus", f"{family.label} cannot be split across GPUs: its denoiser has no context-parallel plan in "
            "diffusers (only Wan models have one).", "set gpus to 1.",
        )


def check_heads(transformer_config: dict[str, Any], ulysses_degree: int) -> None:
    """Ulysses gives each rank ``heads / degree`` attention heads, so the degree must divide the head count."""
    heads = int(transformer_config.get("num_attention_heads", 0))
    if ulysses_degree > 1 and (heads == 0 or heads % ulysses_degree):
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and n <= 8]
        raise InputError(
            "gpus", f"the model has {heads} attention heads, which {ulysses_degree} GPUs cannot share evenly.",
            f"use gpus {' or '.join(map(str, fits)) or 1}.",
        )


def check_device_count(gpus: int, available: int) -> None:
    if gpus > available:
        raise InputError(
            "gpus", f"{gpus} GPUs asked for, {available} visible to this ComfyUI.",
            f"use gpus {max(1, available)} or fewer (or make the GPUs visible: CUDA_VISIBLE_DEVICES).",
        )


def video_tokens(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens the transformer's blocks see for a latent ``[B, C, F, H, W]``."""
    _, _, f, h, w = latent_shape
    pt, ph, pw = patch_size
    return (f // pt) * (h // ph) * (w // pw)


def check_tokens(tokens: int, gpus: int) -> None:
    """Plain Ulysses splits the video tokens evenly; a remainder would make the ranks' shards unequal."""
    if gpus > 1 and tokens % gpus:
        raise InputError(
            "gpus", f"this size gives {tokens} video tokens per frame grid, which {gpus} GPUs cannot split evenly.",
            "change width or height by one step of the size multiple, or use gpus 1.",
        )
