"""Weight precision: the dtype weights are loaded in and, for fp8, stored in between uses.

fp8 storage halves weight memory; each layer's weights are upcast to bf16 just before it computes. Layers whose
errors compound (embeddings, norms, the patch/condition embedders, UMT5's ``wo``) stay in bf16.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable

import torch

from .errors import InputError


class WeightDtype(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP8_E4M3FN = "fp8_e4m3fn"

    @classmethod
    def parse(cls, value: str) -> "WeightDtype":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError("weight_dtype", f"'{value}' is not a known weight dtype.", f"pick one of {choices}.")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float16 if self is WeightDtype.FP16 else torch.bfloat16

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is WeightDtype.FP8_E4M3FN else self.compute_dtype


# Module-name patterns (regular expressions, matched with re.search) kept in compute precision under fp8.
DENOISER_FP8_SKIP = ("patch_embedding", "condition_embedder", "norm", "proj_out", "pos_embed", "time_embed", "conv_in", "conv_out")
# UMT5 feeds its FFN output projection the activations cast to ``wo.weight.dtype``: fp8 there breaks it.
TEXT_ENCODER_FP8_SKIP = ("wo", "norm", "shared", "embed", "relative_attention_bias", "lm_head")


def apply_fp8_storage(modules: Iterable[tuple[Any, tuple[str, ...]]], compute_dtype: torch.dtype) -> list[str]:
    """Store the weights of each (module, skip patterns) pair in fp8, upcasting per layer at compute time.

    Returns a note per module describing what was done.
    """
    from diffusers.hooks import apply_layerwise_casting

    notes = []
    for module, skip in modules:
        if module is None:
            continue
        apply_layerwise_casting(
            module,
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=compute_dtype,
            skip_modules_pattern=skip,
            non_blocking=True,
        )
        notes.append(f"{type(module).__name__}: fp8 storage, {str(compute_dtype).replace('torch.', '')} compute")
    return notes


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, as stored now."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
    return total
