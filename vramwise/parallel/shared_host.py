"""Streamed ranks on one host share one copy of the blocks' host buffers instead of pinning N copies.

The stream engine (offload/stream.py) packs each block into one flat host buffer. Here rank 0 packs into files
in /dev/shm mapped ``MAP_SHARED`` (``torch.from_file(shared=True)``); the other ranks map the same files and
point their blocks at them without copying, one rank at a time, so a rank's private copy of the weights (from
loading) is freed before the next rank loads; once every rank has mapped them the files are unlinked, so nothing
is left behind whatever happens later (the group also removes leftovers when it stops). With CUDA each rank registers the mapping as pinned
(``cudaHostRegister``): the pages are shared, so pinning them in N processes does not copy them.

This subclasses ``StreamOffload`` and replaces only ``_pack`` (where the host buffers are made): the engine has
no hook for supplying host memory, and the rest of it (slots, prefetch, hooks) is used unchanged.
"""

from __future__ import annotations

import os
import torch

from ..errors import InputError
from ..offload.stream import StreamOffload, StreamSettings, _get, _set, _view

SHM_DIR = "/dev/shm"


def _register_pinned(host: torch.Tensor) -> bool:
    if not torch.cuda.is_available() or host.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
    return int(err) == 0


class SharedHostStream(StreamOffload):
    """``StreamOffload`` whose block buffers live in host memory shared by all ranks of the process group."""

    def __init__(self, model: torch.nn.Module, device: torch.device, settings: StreamSettings, *, token: str,
                 rank: int) -> None:
        self._token = token
        self._rank = rank
        self.shared_bytes = 0  # bytes of block buffers this rank maps from the shared files
        self.written_bytes = 0  # bytes this rank copied into them (rank 0 only)
        self.pinned = False
        super().__init__(model, device, settings)

    @property
    def pin(self) -> bool:
        return False  # the buffers are registered as pinned after mapping, not allocated pinned

    def _path(self, i: int) -> str:
        return os.path.join(SHM_DIR, f"vramwise-{self._token}-{i}")

    def _check_shm(self) -> None:
        total = sum(l.nbytes for l in self.layouts + self.transient_layouts)
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
        if total > free:
            raise InputError(
                "offload_mode", f"streaming on several GPUs shares {total / 2**30:.1f} GiB of block weights through "
                f"{SHM_DIR}, which has {free / 2**30:.1f} GiB free.",
                f"enlarge {SHM_DIR} (docker: --shm-size), use offload_mode none (resident on every GPU), or gpus 1.",
            )

    def _pack(self) -> None:
        """Rank 0 creates and fills the shared buffers; every other rank maps them without copying. The caller
        orders this (rank 0 first, then the others) with barriers; see worker.py."""
        layouts = self.layouts + self.transient_layouts
        if self._rank == 0:
            self._check_shm()
        for i, layout in enumerate(layouts):
            host = torch.from_file(self._path(i), shared=True, size=layout.nbytes, dtype=torch.uint8)
            for e in layout.entries:
                if self._rank == 0:
                    _view(host, e).copy_(_get(e).detach().to("cpu"))
                _set(e, _view(host, e))
            if self._rank == 0:
                self.written_bytes += layout.nbytes
            layout.host = host
            self.shared_bytes += layout.nbytes
        if self.sync.cuda:
            self.pinned = all(_register_pinned(l.host) for l in layouts)

    def unlink(self) -> None:
        """Remove the buffers' names once every rank has mapped them; the mappings stay valid."""
        for i in range(len(self.layouts) + len(self.transient_layouts)):
            try:
                os.unlink(self._path(i))
            except FileNotFoundError:
                pass
