"""LoRA terms on a denoiser's Linear layers for one run, never touching the stored weights (the stream engine's
in-slot fusion is ``placement.SlotFuser``).

- ``apply_lora_hooks``: a forward hook per target Linear adds ``scale * (x @ A^T) @ B^T (+ scale * bias)`` to its
  output (unfused). It works under every placement (accelerate's model/sequential hooks, diffusers' group offload
  and fp8 layerwise casting, GGUF's quantized Linear), because it only sees the layer's input and output. A and B
  are moved to the output's device once per run (bf16, a rank-64 14B LoRA is ~0.7 GB) and dropped on removal.
- ``fused_weight``: a new tensor ``W + round(scale * (B @ A) in fp32)``, for a layer given a fused copy for the run;
  the same arithmetic as PEFT's ``merge`` behind diffusers' ``fuse_lora`` on the CPU (fp32 product, one rounding to
  the weight dtype, then the add).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .convert import LoraLayer


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA on one layer at one strength."""

    layer: LoraLayer
    strength: float

    @property
    def scale(self) -> float:
        return self.layer.scale * self.strength


@dataclass
class LoraHooksConfig:
    """Target Linear modules and the LoRA terms each gets (several chained LoRAs: several terms)."""

    targets: dict[torch.nn.Module, list[LoraTerm]]


@dataclass
class LoraHooks:
    """Handle of ``apply_lora_hooks``; ``remove`` takes the hooks and the device copies of A/B away."""

    handles: list[Any] = field(default_factory=list)
    device_copies: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def on(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (id(t), device, dtype)
        got = self.device_copies.get(key)
        if got is None:
            got = t.to(device=device, dtype=dtype, non_blocking=True)
            self.device_copies[key] = got
        return got

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.device_copies.clear()


def apply_lora_hooks(config: LoraHooksConfig) -> LoraHooks:
    """Add each target's LoRA terms to its output through a forward hook (see the module docstring)."""
    state = LoraHooks()

    def make(terms: list[LoraTerm]):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0] if args else None
            dev, dt = output.device, output.dtype
            extra = None
            for term in terms:
                s = term.scale
                if s == 0.0:
                    continue
                part = None
                if term.layer.down is not None and x is not None:
                    a = state.on(term.layer.down, dev, dt)
                    b = state.on(term.layer.up, dev, dt)
                    part = F.linear(F.linear(x.to(device=dev, dtype=dt), a), b) * s
                if term.layer.bias is not None:
                    bias = state.on(term.layer.bias, dev, dt) * s
                    part = bias if part is None else part + bias
                if part is not None:
                    extra = part if extra is None else extra + part
            return output if extra is None else output + extra

        return hook

    try:
        for module, terms in config.targets.items():
            state.handles.append(module.register_forward_hook(make(list(terms))))
    except BaseException:
        state.remove()
        raise
    return state


def delta_weight(layer: LoraLayer, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``scale * B @ A`` computed in fp32 and rounded once to ``dtype`` (PEFT's CPU merge arithmetic)."""
    b = layer.up.to(device=device, dtype=torch.float32, non_blocking=True)
    a = layer.down.to(device=device, dtype=torch.float32, non_blocking=True)
    return ((b @ a) * scale).to(dtype)


@torch.no_grad()
def fused_weight(weight: torch.Tensor, terms: list[LoraTerm]) -> torch.Tensor:
    """A new tensor ``weight + deltas`` (for a weight that is not ours to edit, e.g. an fp8 weight just upcast)."""
    out = weight.clone() if weight.dtype.is_floating_point and weight.element_size() > 1 else weight.to(torch.bfloat16)
    for term in terms:
        if term.scale != 0.0 and term.layer.down is not None:
            out.add_(delta_weight(term.layer, term.scale, out.dtype, out.device))
    return out
