"""``Placement``: everything this pack did to place one loaded pipeline, owned by its ``LoadedPipeline``.

Nothing of ours is stored on the diffusers objects: the plan, the stream engines and CFG batchers, the fp8 skip
patterns, the compile choice and the run-scoped weight patchers live here, and ``release()`` gives back what a
run held. Later features reach the placed model through it:

- ``weight_patchers``: run-scoped patches (LoRA) append to and remove from this list (mutate it, never rebind it:
  the stream engines hold the same list). Each has ``on_block_resident(block_index, block)``, which a stream
  engine calls on the compute stream once a block's parameters point at a freshly filled GPU slot and before the
  block computes (edits of the slot vanish when it is refilled; the packed host buffer is never touched), and
  ``transform_weight(module, weight) -> weight``, which the lean chunked forward calls where it takes a Linear's
  weight for compute (after any fp8 upcast). ``name_of(module)`` gives a Linear's qualified name.
- ``stream_engines`` (one per streamed denoiser) and ``cfg_batchers`` (one per denoiser with batched CFG): a step
  cache can see whether CFG is batched and wrap the denoiser call outside the batcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .compile import resolve_compile


class WeightPatcher(Protocol):
    def on_block_resident(self, block_index: int, block: torch.nn.Module) -> None: ...

    def transform_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor: ...


@dataclass(eq=False)
class Placement:
    device: torch.device
    mode: str = "none"  # the OffloadMode value that was applied (auto resolves to one of the others)
    plan: Any = None  # memory.planner.Estimate when the planner chose the placement (offload_mode auto)
    fp8_skip: tuple[str, ...] = ()  # denoiser layers kept in compute precision under fp8 storage (regexes)
    compile_choice: str | None = None  # the loader node's ``compile`` input, re-applied when the model reloads
    denoisers: dict[str, torch.nn.Module] = field(default_factory=dict)
    stream_engines: list[Any] = field(default_factory=list)
    cfg_batchers: list[Any] = field(default_factory=list)
    leaf_streamers: list[Any] = field(default_factory=list)  # leaf_stream.LeafStreamer of big encoders (stream)
    # The one-expert plan (Wan2.2 A14B): each expert's component folder, re-read into the shared pinned buffers
    # when that expert's turn comes (expert_swap.py); empty otherwise.
    expert_files: dict[str, Any] = field(default_factory=dict)
    expert_host: Any = None  # expert_swap.SharedBlockHost while the one-expert plan is placed
    weight_patchers: list[WeightPatcher] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _releasers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _names: dict[int, str] | None = field(default=None, repr=False)

    def on_release(self, fn: Callable[[], None]) -> None:
        """Add what a placer needs done after every run and on errors (offload hooks, engine slots)."""
        self._releasers.append(fn)

    def release(self) -> None:
        """Move whatever the placement lets go of back off the GPU; called after every run and on errors."""
        for fn in self._releasers:
            fn()

    def remove(self) -> None:
        """Release, then take the engines' and batchers' hooks off the modules (weights stay on the host)."""
        self.release()
        for eng in self.stream_engines:
            eng.remove()
        for b in self.cfg_batchers:
            b.detach()
        for streamer in self.leaf_streamers:
            streamer.remove()
        self.stream_engines.clear()
        self.cfg_batchers.clear()
        self.leaf_streamers.clear()

    def name_of(self, module: torch.nn.Module) -> str | None:
        """Qualified name of a denoiser's Linear (``transformer.blocks.0.attn1.to_q``), None for other modules."""
        if self._names is None:
            from ..architectures import linear_names

            self._names = {}
            for name, den in self.denoisers.items():
                self._names.update(linear_names(den, name))
        return self._names.get(id(module))

    @property
    def compiled(self) -> bool:
        return any(getattr(e, "compiled", False) for e in self.stream_engines)

    @property
    def cfg_batched(self) -> bool:
        """Whether both CFG passes of a step run as one batch-2 forward (until an OOM turns a batcher off)."""
        return any(b.enabled for b in self.cfg_batchers)

    def set_compile(self, choice: str | bool | None) -> str | None:
        """Regional compilation of the stream engines' blocks; a note for the user (None: no engines)."""
        if choice is not None:
            self.compile_choice = choice if isinstance(choice, str) else ("on" if choice else "off")
        if not self.stream_engines:
            return None
        on = resolve_compile(choice)
        for eng in self.stream_engines:
            eng.set_compile(on)
        if on:
            return ("compile: denoiser blocks compiled with torch.compile (the first run at a new size spends "
                    "~20-60 s compiling, later steps are faster)")
        why = "" if choice == "off" else " (needs a CUDA GPU and Triton)"
        return f"compile: off{why}, denoiser runs eager"

    def describe(self) -> str:
        parts = [self.plan.describe() if self.plan is not None else f"offload {self.mode}"]
        parts += [e.describe() for e in self.stream_engines]
        if self.cfg_batchers:
            parts.append("CFG batched" if self.cfg_batched else "CFG passes one after the other")
        return "; ".join(parts)


__all__ = ["Placement", "WeightPatcher"]
