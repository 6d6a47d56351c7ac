"""Build a model from a config and a converted state dict without allocating random weights first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFolderError


def keep_fp32_patterns(cls: Any) -> tuple[str, ...]:
    pats = []
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        pats += list(getattr(cls, attr, None) or [])
    return tuple(pats)


def keeps_fp32(name: str, patterns: tuple[str, ...], dtype: torch.dtype) -> bool:
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    parts = name.split(".")
    return any(p in parts or f".{p}." in f".{name}" for p in patterns)


def materialize(model_factory, state: dict[str, torch.Tensor], path: Path, what: str, tied: dict[str, str] | None = None):
    """Instantiate with parameters on the meta device, then assign the loaded tensors (no copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_factory()
    expected = set(model.state_dict().keys())
    for target, source in (tied or {}).items():
        if target in expected and target not in state and source in state:
            state[target] = state[source]
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFolderError(
            f"'{path.name}' does not fit a {what}: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). It is another model or a damaged file."
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFolderError(f"'{path.name}' does not fit a {what}: {e}") from e
    if tied:
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()
    return model.eval()
