"""How a run's LoRA terms reach each denoiser, decided per placement (see ``apply_for_run``).

- resident / model / group / sequential offload, fp8 layerwise casting, GGUF: unfused forward hooks
  (``apply.apply_lora_hooks``). They compose with every offload hook because they only see a layer's input and
  output, never its stored weight; the cost is one rank-r matmul pair per layer call.
- ``stream``: the engine's lean forward takes weights straight from its GPU slots (``F.linear``), so hooks inside
  a block make it fall back to the stock forward (correct, slower, bigger peak), and its tail reads ``proj_out``'s
  weight directly, so a hook there would never run. Until the engine offers a weight hook, block layers get hooks
  and ``proj_out`` gets a fused copy for the run (``W + delta`` computed in fp32, one new tensor of its size,
  put back on detach); the stored tensors are never written.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .apply import LoraHooksConfig, LoraTerm, apply_lora_hooks, fused_weight

Targets = dict[torch.nn.Module, list[LoraTerm]]


def _stream_engine(pipe: Any, denoiser: torch.nn.Module) -> Any | None:
    for eng in getattr(pipe, "_vramwise_stream", None) or ():
        if eng.model is denoiser:
            return eng
    return None


def _lean_tail_reads(eng: Any, denoiser: torch.nn.Module) -> set[int]:
    """Linear layers the lean model forward uses without calling them (their hooks would not run)."""
    lean = getattr(eng, "lean", None)
    if lean is None or not getattr(lean, "model_forward", False) or "forward" not in denoiser.__dict__:
        return set()
    proj = getattr(denoiser, "proj_out", None)
    return {id(proj)} if isinstance(proj, torch.nn.Linear) else set()


class _FusedCopies:
    """Point some layers at ``W + delta`` copies for one run; ``restore`` puts the stored tensors back."""

    def __init__(self, targets: Targets) -> None:
        self.saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for module, terms in targets.items():
                    w = module.weight
                    self.saved.append((w, w.data))
                    w.data = fused_weight(w.data, terms).to(w.dtype)
                    if module.bias is not None and any(t.layer.bias is not None for t in terms):
                        b = module.bias
                        new = b.data.clone()
                        for t in terms:
                            if t.layer.bias is not None and t.scale != 0.0:
                                new.add_(t.layer.bias.to(new.device, new.dtype) * t.scale)
                        self.saved.append((b, b.data))
                        b.data = new
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for param, data in reversed(self.saved):
            param.data = data
        self.saved.clear()


def apply_for_run(pipe: Any, plans: dict[str, Targets]) -> tuple[Callable[[], None], list[str]]:
    """Attach every denoiser's terms the way its placement needs; returns the undo and a note per method."""
    hooked: Targets = {}
    fused: Targets = {}
    for name, targets in plans.items():
        denoiser = getattr(pipe, name, None)
        eng = _stream_engine(pipe, denoiser) if denoiser is not None else None
        tail = _lean_tail_reads(eng, denoiser) if eng is not None else set()
        for module, terms in targets.items():
            (fused if id(module) in tail else hooked)[module] = terms
    notes = []
    undo: list[Callable[[], None]] = []
    try:
        if hooked:
            hooks = apply_lora_hooks(LoraHooksConfig(hooked))
            undo.append(hooks.remove)
            notes.append(f"LoRA unfused on {len(hooked)} layers (x·Aᵀ·Bᵀ added to their outputs)")
        if fused:
            copies = _FusedCopies(fused)
            undo.append(copies.restore)
            notes.append(f"LoRA fused into a run copy of {len(fused)} layers (stream tail)")
    except BaseException:
        for u in reversed(undo):
            u()
        raise

    def detach() -> None:
        for u in reversed(undo):
            u()

    return detach, notes
