"""Whether regional ``torch.compile`` of the stream engine's blocks is on: the user's choice against the machine."""

from __future__ import annotations

import torch


def compile_available() -> bool:
    """Regional compilation needs a CUDA device and Triton (inductor's GPU code generator)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken Triton: run eager
        return False
    return True


def resolve_compile(choice: str | bool | None) -> bool:
    """``auto``/None: on where it can work (CUDA + Triton); ``on``/``off`` as asked (never on the CPU)."""
    if isinstance(choice, bool):
        return choice and torch.cuda.is_available()
    if choice in (None, "auto"):
        return compile_available()
    return choice == "on" and torch.cuda.is_available()
