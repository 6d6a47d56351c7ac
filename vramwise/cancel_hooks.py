"""Cancel checks inside long single operations: forward pre-hooks that ask before each block runs.

A sampling step is cancelled between model calls (sampling.observe_steps), but one call can be long: a huge
transformer forward, the VAE encoding the conditioning video, the VAE decoding the clip (Wan decodes one latent
frame per decoder call, a tiled decode one tile per call; neither has a callback). Pre-hooks on the repeated
blocks let Cancel land within one block; they live only for the operation and are removed however it ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch


def block_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and every module held in one of its ModuleLists (down/up blocks, their resnets, DiT blocks)."""
    out = [module]
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList):
            out.extend(m)
    return out


def _compiled(module: torch.nn.Module) -> bool:
    # A hook on a block compiled with Module.compile() is traced into its graph, and a Python cancel check there
    # breaks the graph (and the speed compile is for); such blocks are left to the per-call check.
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def cancel_hooks(modules: Iterable[torch.nn.Module], check_cancel: Callable[[], None] | None) -> Iterator[None]:
    """Call ``check_cancel`` before each of ``modules`` runs while the block is active."""
    if check_cancel is None:
        yield
        return

    def pre_hook(module: torch.nn.Module, args) -> None:
        check_cancel()

    handles = [m.register_forward_pre_hook(pre_hook) for m in modules if not _compiled(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
