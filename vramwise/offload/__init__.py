"""Apply an offload mode to a freshly loaded pipeline and pin where it computes."""

from __future__ import annotations

from typing import Any

import torch

from .components import components
from .modes import DESCRIPTIONS, PLACERS, OffloadMode
from .placement import Placement
from .stream import StreamSettings

# (pipeline class, device) -> our subclass of it whose ``_execution_device`` is that device
_PINNED_CLASSES: dict[tuple[type, torch.device], type] = {}
_BASE_OF: dict[type, type] = {}  # our subclass -> the diffusers class it pins


def pin_execution_device(pipe: Any, device: torch.device) -> None:
    """Make ``pipe._execution_device`` report ``device`` whatever the offload hooks or a CPU text encoder say.

    diffusers infers the execution device from the first component or its hooks; with a text encoder kept on
    the CPU it would pick the CPU. The instance's class is swapped for a subclass (one per class and device, kept
    here) whose property answers ``device``; nothing is stored on the instance.
    """
    base = _BASE_OF.get(type(pipe), type(pipe))
    key = (base, torch.device(device))
    sub = _PINNED_CLASSES.get(key)
    if sub is None:
        sub = type(base.__name__, (base,), {
            "_execution_device": property(lambda self, _d=key[1]: _d),
            "__module__": base.__module__,
        })
        _PINNED_CLASSES[key] = sub
        _BASE_OF[sub] = base
    pipe.__class__ = sub


def apply_offload(
    pipe: Any,
    mode: OffloadMode,
    placement: Placement,
    denoiser_names: tuple[str, ...],
    keep_on_cpu: tuple[str, ...] = (),
    stream_settings: StreamSettings | None = None,
) -> list[str]:
    """Place the pipeline's components for ``mode`` (never ``auto``: the loader resolves it with the planner).

    What the mode must release after each run and on errors goes to ``placement``; returns notes for the user.
    """
    if mode is OffloadMode.AUTO:
        raise ValueError("offload mode auto is resolved to a plan by the loader before placing")
    device = placement.device
    placement.mode = mode.value
    placement.denoisers = {n: m for n in denoiser_names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)}
    notes = [f"offload {mode.value}: {DESCRIPTIONS[mode]}"]
    if device.type != "cuda" and mode is not OffloadMode.NONE:
        notes.append(f"no CUDA device: '{mode.value}' runs its hooks with the CPU as compute and storage device")
    for name in keep_on_cpu:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to("cpu")
            notes.append(f"{name} runs on the CPU")
    if mode is OffloadMode.STREAM:
        PLACERS[mode](pipe, placement, keep_on_cpu, denoiser_names, settings=stream_settings)
    else:
        PLACERS[mode](pipe, placement, keep_on_cpu, denoiser_names)
    pin_execution_device(pipe, device)
    return notes


__all__ = ["OffloadMode", "Placement", "StreamSettings", "apply_offload", "pin_execution_device", "components",
           "DESCRIPTIONS"]
