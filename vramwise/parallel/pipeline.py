"""The pipeline side of a parallel model: everything but the denoiser(s), which live in the workers.

The parent process never reads the denoiser weights (33 GB for Wan 14B): diffusers loads a pipeline with an
optional component passed as ``None`` and skips its folder, and the proxies are set in afterwards (passing them
to ``from_pretrained`` directly is refused: they are not ``ModelMixin``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .launch import ParallelDenoisers


def load_without_denoisers(family: Any, folder: Path | str, torch_dtype: torch.dtype) -> Any:
    """``family``'s diffusers pipeline from ``folder`` with ``family.denoiser_names`` left out (set to None)."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_class_name)
    skip = {name: None for name in family.denoiser_names}
    return cls.from_pretrained(folder, torch_dtype=torch_dtype, **skip)


def attach(pipe: Any, parallel: ParallelDenoisers) -> None:
    """Put the proxies where the denoisers were; denoisers the folder lacks stay None."""
    parallel.install(pipe)
