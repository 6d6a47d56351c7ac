"""How a run's LoRA terms reach each denoiser, decided per placement (see ``apply_for_run``).

- resident / model / group / sequential offload, fp8 layerwise casting, GGUF: unfused forward hooks
  (``apply.apply_lora_hooks``). They compose with every offload hook because they only see a layer's input and
  output, never its stored weight. Cost, by arithmetic (not measured here): a rank-r pair on an in x out layer adds
  r*(in+out)/(in*out) of its FLOPs, 2.5% for Wan 14B's 5120x5120 projections at rank 64 and 1.7% for its FFN,
  per call and per token. Fusing instead would write the stored weights (restoring them needs a second copy or
  leaves rounding drift), which the design rules out for every placement whose GPU weights are not a copy.
- ``stream``: the engine packs the blocks in pinned host buffers and copies them into GPU slots; its lean forward
  takes weights straight from the slots (``F.linear``), so a hook inside a block would make it fall back to the
  stock forward (correct, slower, bigger peak), and the slots are a per-run copy anyway. Fusing costs
  2*out*in*r FLOPs per layer per block fill, against the layer's 2*N*in*out for N tokens: r/N, 0.2% at rank 64
  and 480x832x81 (32760 tokens; 0.1% with both CFG passes batched), against 2.5% unfused. So the LoRA is fused
  into the slot instead (``SlotFuser``, a ``Placement.weight_patchers`` entry): ``on_block_resident`` runs ``W_slot.addmm_(B, A, alpha=scale)`` once per
  slot fill (one kernel, fp32 accumulation, rounded once; the slot is refilled from the untouched host buffer next
  time, so nothing outlives the run), and bias deltas likewise. Weights kept in fp8 in the slot (lean forward,
  fp8 storage) cannot take a small delta (3 mantissa bits would round it away), so those are fused where the lean
  forward upcasts them (``transform_weight``, in place on the fresh upcast copy). Slot tensors are inputs of the
  compiled pieces, and A/B/scale are not seen by them, so a strength change cannot recompile anything.
  ``proj_out`` (resident, read directly by the lean tail, its bias not in a slot) gets a fused copy for the run
  (``W + delta`` in fp32, one tensor of its size, put back on detach). Layers outside the blocks that run as
  modules (the condition embedder's) keep the unfused hooks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .apply import LoraHooksConfig, LoraTerm, apply_lora_hooks, fused_weight

Targets = dict[torch.nn.Module, list[LoraTerm]]


def _stream_engine(loaded: Any, denoiser: torch.nn.Module) -> Any | None:
    for eng in loaded.placement.stream_engines:
        if eng.model is denoiser:
            return eng
    return None


def _device_copy(cache: dict, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (id(t), device, dtype)
    got = cache.get(key)
    if got is None:
        got = cache[key] = t.to(device=device, dtype=dtype, non_blocking=True)
    return got


class SlotFuser:
    """The stream engine's weight patcher for one run: fuses the LoRA into each block's GPU slot (see above)."""

    def __init__(self, targets: Targets) -> None:
        self.targets = {id(m): terms for m, terms in targets.items()}
        self.in_transform: set[int] = set()  # layers whose weight stayed fp8 in the slot: fused at upcast time
        self._copies: dict = {}
        self.fills = 0

    def _add(self, weight: torch.Tensor, terms: list[LoraTerm]) -> None:
        for t in terms:
            if t.scale != 0.0 and t.layer.down is not None:
                b = _device_copy(self._copies, t.layer.up, weight.device, weight.dtype)
                a = _device_copy(self._copies, t.layer.down, weight.device, weight.dtype)
                weight.addmm_(b, a, alpha=t.scale)

    @torch.no_grad()
    def on_block_resident(self, block_index: int, block: torch.nn.Module) -> None:
        self.fills += 1
        for sub in block.modules():
            terms = self.targets.get(id(sub))
            if terms is None:
                continue
            w = sub.weight
            if w.element_size() == 1:
                self.in_transform.add(id(sub))
            else:
                self.in_transform.discard(id(sub))
                self._add(w.data, terms)
            if sub.bias is not None:
                for t in terms:
                    if t.layer.bias is not None and t.scale != 0.0:
                        sub.bias.data.add_(_device_copy(self._copies, t.layer.bias, sub.bias.device,
                                                       sub.bias.dtype), alpha=t.scale)

    @torch.no_grad()
    def transform_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        if id(module) not in self.in_transform:
            return weight
        # ``weight`` is the lean forward's fresh upcast of an fp8 slot weight: ours to edit in place.
        self._add(weight, self.targets[id(module)])
        return weight

    def drop(self) -> None:
        self._copies.clear()


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


def apply_for_run(loaded: Any, plans: dict[str, Targets]) -> tuple[Callable[[], None], list[str]]:
    """Attach every denoiser's terms the way its placement needs; returns the undo and a note per method."""
    pipe = loaded.pipe
    patchers = loaded.placement.weight_patchers  # mutated, never rebound: the engines hold the same list
    hooked: Targets = {}
    fused: Targets = {}
    in_slot: Targets = {}
    for name, targets in plans.items():
        denoiser = getattr(pipe, name, None)
        eng = _stream_engine(loaded, denoiser) if denoiser is not None else None
        tail = _lean_tail_reads(eng, denoiser) if eng is not None else set()
        blocks = {id(m) for b in eng.blocks for m in b.modules()} if eng is not None else set()
        for module, terms in targets.items():
            if id(module) in tail:
                fused[module] = terms
            elif id(module) in blocks:
                in_slot[module] = terms
            else:
                hooked[module] = terms
    notes = []
    undo: list[Callable[[], None]] = []
    try:
        if in_slot:
            fuser = SlotFuser(in_slot)
            patchers.append(fuser)

            def unregister(f=fuser) -> None:
                if f in patchers:
                    patchers.remove(f)
                f.drop()

            undo.append(unregister)
            notes.append(f"LoRA fused into the stream engine's GPU slots on {len(in_slot)} layers "
                         "(the stored weights are not touched)")
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
