"""Where each pipeline component lives between uses, one function per offload mode.

Every mode runs on a machine without CUDA too (the CPU is then both the compute and the storage device), so
CPU tests exercise the same hooks users get on a GPU. A placer records what it did (what to release after a run)
on the ``Placement`` it is handed. ``auto`` has no placer: the loader asks the planner for a plan and applies the
concrete mode it names; mechanisms never import the planner.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..errors import InputError
from .components import components
from .stream import place_stream

if TYPE_CHECKING:
    from .placement import Placement


class OffloadMode(str, Enum):
    NONE = "none"
    MODEL = "model"
    GROUP = "group"
    SEQUENTIAL = "sequential"
    STREAM = "stream"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: str) -> "OffloadMode":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError("offload_mode", f"'{value}' is not a known offload mode.", f"pick one of {choices}.")


DESCRIPTIONS: dict[OffloadMode, str] = {
    OffloadMode.NONE: "everything resident on the GPU (fastest; needs VRAM for all weights)",
    OffloadMode.MODEL: "each component moved to the GPU while it runs (text encoder, then denoiser, then VAE)",
    OffloadMode.GROUP: "denoiser blocks streamed to the GPU one at a time, prefetched on a CUDA stream",
    OffloadMode.SEQUENTIAL: "every layer fetched when it runs (lowest VRAM, several times slower)",
    OffloadMode.STREAM: (
        "denoiser blocks streamed from pinned RAM through reused GPU slots, both CFG passes per block "
        "(low VRAM, near full speed; needs host RAM for the weights)"
    ),
    OffloadMode.AUTO: "the fastest plan that fits the free VRAM and host RAM (estimated per run)",
}


def place_resident(pipe: Any, placement: "Placement", skip: Iterable[str], denoisers: Iterable[str]) -> None:
    for _, module in components(pipe, skip):
        module.to(placement.device)


def place_model_offload(pipe: Any, placement: "Placement", skip: Iterable[str], denoisers: Iterable[str]) -> None:
    """Chain accelerate hooks so each component evicts the previous one when it starts.

    diffusers' own ``enable_model_cpu_offload`` would move an excluded text encoder onto the GPU, and it re-runs
    itself after every call; chaining here keeps a CPU text encoder on the CPU.
    """
    from accelerate import cpu_offload_with_hook

    device = placement.device
    hooks = []
    previous = None
    for _, module in components(pipe, skip):
        _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
        hooks.append(previous)

    def offload_all() -> None:
        for hook in hooks:
            hook.offload()

    placement.on_release(offload_all)


def place_group_offload(pipe: Any, placement: "Placement", skip: Iterable[str], denoisers: Iterable[str]) -> None:
    from diffusers.hooks import apply_group_offloading

    device = placement.device
    use_stream = device.type == "cuda"
    denoisers = set(denoisers)
    for name, module in components(pipe, skip):
        if name in denoisers:
            # One block per group with a prefetch stream: a Wan 14B block computes for longer than it takes to
            # cross PCIe at 480p, so the copy hides behind the previous block.
            apply_group_offloading(
                module,
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=use_stream,
                non_blocking=use_stream,
            )
        else:
            apply_group_offloading(
                module,
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=use_stream,
                non_blocking=use_stream,
            )


def place_sequential(pipe: Any, placement: "Placement", skip: Iterable[str], denoisers: Iterable[str]) -> None:
    from accelerate import cpu_offload

    for _, module in components(pipe, skip):
        cpu_offload(module, execution_device=placement.device)


# ``placer(pipe, placement, skip, denoisers)``: ``skip`` names components left where they are (a CPU text encoder).
PLACERS: dict[OffloadMode, Callable[..., None]] = {
    OffloadMode.NONE: place_resident,
    OffloadMode.MODEL: place_model_offload,
    OffloadMode.GROUP: place_group_offload,
    OffloadMode.SEQUENTIAL: place_sequential,
    OffloadMode.STREAM: place_stream,
}
