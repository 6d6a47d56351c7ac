"""A pipeline's torch components in the order the pipeline runs them."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def components(pipe: Any, skip: Iterable[str] = ()) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's torch modules in the order the pipeline uses them, minus ``skip``."""
    skip = set(skip)
    order = [n for n in getattr(pipe, "model_cpu_offload_seq", "").split("->") if n]
    mods = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and n not in skip}
    ordered = [n for n in order if n in mods] + [n for n in mods if n not in order]
    return [(n, mods[n]) for n in ordered]
