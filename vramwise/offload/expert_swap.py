"""Two experts, one set of pinned block buffers: Wan2.2 A14B under the one-expert plan.

A14B's high-noise and low-noise experts have identical blocks (40 x the same shapes), and a run uses one, then the
other (diffusers switches at the boundary timestep). Pinning both in fp8 takes 26 GiB, which with the text encoder
does not fit a 32 GiB machine; pinning one takes 13. So the second expert's blocks are never read at load
(``weight_loading.load_model(unread_prefix=...)``, meta tensors), both stream engines point their blocks at the same
pinned buffers, and when an engine activates while the buffers hold the other expert, it re-reads its own blocks
from its safetensors files into them (plain file reads; page-cache hits when RAM allows). The non-block weights
(embedders, norms, ~1 GB per expert) stay loaded for both.

What a swap costs is recorded (``SharedBlockHost.swaps``) and shown in the engine's description; a run of A14B
that starts on the expert the previous run ended with does one swap, at the boundary.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFolderError


@dataclass
class SharedBlockHost:
    """The pinned block buffers two stream engines share, and which engine's weights they hold now."""

    buffers: list[torch.Tensor] | None = None
    owner: Any = None  # the StreamOffload whose blocks the buffers hold
    swaps: list[float] = field(default_factory=list)  # seconds of each re-read

    def adopt(self, engine: Any) -> None:
        """The first engine packed its blocks: its buffers become the shared ones."""
        self.buffers = [layout.host for layout in engine.layouts]
        self.owner = engine

    def take(self, engine: Any) -> None:
        """Before ``engine`` runs: make the buffers hold its blocks (re-read from its files if they do not)."""
        if self.owner is engine:
            return
        if engine.weight_file is None:
            raise RuntimeError("a stream engine sharing expert buffers has no weight files to re-read")
        t0 = time.perf_counter()
        self.owner = None  # half-filled buffers belong to nobody if the read fails
        fill_blocks(engine, Path(engine.weight_file))
        self.owner = engine
        self.swaps.append(time.perf_counter() - t0)

    def release(self) -> None:
        self.buffers = None
        self.owner = None


def same_layout(a: Any, b: Any) -> bool:
    """Whether two engines' block layouts are byte-for-byte the same (so one buffer per block serves both)."""
    if len(a) != len(b):
        return False
    for la, lb in zip(a, b):
        if la.nbytes != lb.nbytes or len(la.entries) != len(lb.entries):
            return False
        for ea, eb in zip(la.entries, lb.entries):
            if (ea.name, tuple(ea.shape), ea.dtype, ea.offset) != (eb.name, tuple(eb.shape), eb.dtype, eb.offset):
                return False
    return True


def _entry_view(flat: torch.Tensor, e: Any) -> torch.Tensor:
    """An entry's tensor inside its block's flat buffer (as the stream engine lays it out; not imported from
    ``stream``, which imports this module)."""
    size = e.numel * torch.empty((), dtype=e.dtype).element_size()
    return flat[e.offset:e.offset + size].view(e.dtype).view(e.shape)


def fill_blocks(engine: Any, folder: Path) -> None:
    """Read ``engine``'s block tensors from the safetensors files in ``folder`` into its (shared) host buffers, in
    each entry's storage dtype: a plain read straight into the buffer when the file has that dtype, else through a
    one-tensor temporary converted on the engine's device (bf16 -> fp8 on the GPU is ~50x a CPU cast)."""
    from ..weight_loading import _read_into, _shards, read_tensor, stored_tensors

    index = {}
    for path in _shards(folder):
        for st in stored_tensors(path):
            index[st.name] = (path, st)
    names = {id(m): q for q, m in engine.model.named_modules()}
    by_file: dict[Path, list] = defaultdict(list)
    for layout in engine.layouts:
        for e in layout.entries:
            qual = names.get(id(e.module), "")
            full = f"{qual}.{e.name}" if qual else e.name
            if full not in index:
                raise ModelFolderError(f"'{folder}' no longer holds '{full}': the expert's files changed on disk "
                                       "since it was loaded; load the model again.")
            path, st = index[full]
            by_file[path].append((st, e, layout))
    convert_on = engine.device if engine.device.type == "cuda" else torch.device("cpu")
    for path, items in by_file.items():
        items.sort(key=lambda it: it[0].offset)
        with open(path, "rb", buffering=0) as f:
            for st, e, layout in items:
                view = _entry_view(layout.host, e)
                if st.dtype == e.dtype and st.nbytes == view.numel() * view.element_size():
                    _read_into(f, st, view)
                else:
                    raw = read_tensor(f, st, st.dtype)
                    view.copy_(raw.to(convert_on).to(e.dtype).view(e.shape))


__all__ = ["SharedBlockHost", "fill_blocks", "same_layout"]
