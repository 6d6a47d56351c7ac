"""Apply an offload mode to a freshly loaded pipeline and pin where it computes."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .modes import DESCRIPTIONS, PLACERS, OffloadMode, components

_PINNED_CLASSES: dict[type, type] = {}


def pin_execution_device(pipe: Any, device: torch.device) -> None:
    """Make ``pipe._execution_device`` report ``device`` whatever the offload hooks or a CPU text encoder say.

    diffusers infers the execution device from the first component or its hooks; with a text encoder kept on
    the CPU it would pick the CPU. The instance's class is swapped for a subclass that answers from a field.
    """
    base = type(pipe)
    if getattr(base, "_vramwise_pinned", False):
        pipe._vramwise_device = device
        return
    sub = _PINNED_CLASSES.get(base)
    if sub is None:
        sub = type(base.__name__, (base,), {
            "_vramwise_pinned": True,
            "_execution_device": property(lambda self: self._vramwise_device),
            "__module__": base.__module__,
        })
        _PINNED_CLASSES[base] = sub
    pipe.__class__ = sub
    pipe._vramwise_device = device


def apply_offload(
    pipe: Any,
    mode: OffloadMode,
    device: torch.device,
    denoiser_names: tuple[str, ...],
    keep_on_cpu: tuple[str, ...] = (),
) -> tuple[Callable[[], None], list[str]]:
    """Place the pipeline's components for ``mode``.

    Returns a function that moves everything the mode lets go of back off the GPU (called after each run and on
    errors) and notes for the user.
    """
    notes = [f"offload {mode.value}: {DESCRIPTIONS[mode]}"]
    if device.type != "cuda" and mode is not OffloadMode.NONE:
        notes.append(f"no CUDA device: '{mode.value}' runs its hooks with the CPU as compute and storage device")
    for name in keep_on_cpu:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to("cpu")
            notes.append(f"{name} runs on the CPU")
    release = PLACERS[mode](pipe, device, keep_on_cpu, denoiser_names)
    pin_execution_device(pipe, device)
    return release, notes


__all__ = ["OffloadMode", "apply_offload", "pin_execution_device", "components", "DESCRIPTIONS"]
