"""Let diffusers' ``enable_parallelism`` run on a CPU-only process.

``ModelMixin._resolve_parallel_config`` (diffusers 0.42.1) computes the rank's device as
``rank % torch.accelerator.device_count()``, which is 0 without an accelerator: ZeroDivisionError. Gloo on CPU
needs no per-rank device at all (every rank is "cpu"), so for the duration of that one call the count reads as 1.
The patch is on ``torch.accelerator`` inside a worker process the pack owns, is undone when the call returns,
and leaves nothing on diffusers' objects. The alternative, building the ``ParallelConfig`` and hooks by hand
(``config.setup`` + ``apply_context_parallel``), would copy diffusers' private setup code instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def at_least_one_device() -> Iterator[None]:
    """``torch.accelerator.device_count()`` is at least 1 inside the block (unchanged where a device exists)."""
    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
