"""``TokenMergePatch``: the ModelPatch that merges tokens during one sampling run, for every supported family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import InputError
from .dit import DitMergeSettings, dit_kind, patch_dit
from .pairing import WINDOWS
from .unet import UnetMergeSettings, is_unet, patch_unet

if TYPE_CHECKING:
    from ..handles import RunInfo, VramwiseModel

MAX_RATIO = 0.9


def merge_method(denoiser: torch.nn.Module) -> str | None:
    """``"dit"`` (Wan, EasyAnimate), ``"unet"`` (I2VGen-XL) or None when token merging does not apply."""
    if dit_kind(denoiser) is not None:
        return "dit"
    if is_unet(denoiser):
        return "unet"
    return None


def step_active(step: int, total: int, start_percent: float, end_percent: float) -> bool:
    """Whether the denoiser calls of step ``step`` (0-based) of ``total`` merge tokens."""
    if total <= 0:
        return False
    x = step / total
    return start_percent <= x < end_percent


@dataclass(eq=False)
class TokenMergePatch:
    """Merge similar tokens in self-attention (DiTs: keys/values; I2VGen-XL: tomesd on spatial blocks).

    ``ratio`` 0 is an exact no-op: nothing is attached at all.
    """

    ratio: float = 0.5
    start_percent: float = 0.1
    end_percent: float = 1.0
    skip_first_blocks: int = 2
    skip_last_blocks: int = 2
    window: str = "spatial+temporal"
    attention_impl: str | None = None  # None: chosen per device (attention.default_impl)
    name: str = "token_merge"
    _handles: list[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= MAX_RATIO:
            raise InputError("ratio", f"{self.ratio} is outside 0..{MAX_RATIO}.", f"use a value from 0 to {MAX_RATIO}.")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise InputError(
                "start_percent",
                f"start_percent {self.start_percent} and end_percent {self.end_percent} do not form a range in 0..1.",
                "use 0 <= start_percent <= end_percent <= 1.",
            )
        if self.window not in WINDOWS:
            raise InputError("window", f"'{self.window}' is not a window.", f"pick one of {', '.join(WINDOWS)}.")
        if self.skip_first_blocks < 0 or self.skip_last_blocks < 0:
            raise InputError("skip_first_blocks", "block counts cannot be negative.", "use 0 or more.")

    def describe(self) -> str:
        if self.ratio == 0:
            return "token merge: off (ratio 0)"
        return (
            f"token merge: ratio {self.ratio:g}, steps {self.start_percent:g}-{self.end_percent:g}, "
            f"DiT blocks skipped {self.skip_first_blocks} first / {self.skip_last_blocks} last, window {self.window}"
        )

    def attach(self, model: "VramwiseModel", run: "RunInfo") -> Callable[[], None]:
        if self.ratio == 0:
            return lambda: None
        denoisers = model.loaded.denoisers
        unsupported = [type(d).__name__ for d in denoisers if merge_method(d) is None]
        if unsupported or not denoisers:
            raise InputError(
                "model",
                f"token merge does not support {', '.join(unsupported) or 'this model'} ({model.family.label}).",
                "remove the Token Merge node (or set ratio 0) for this model.",
            )
        handles: list[Any] = []
        try:
            for denoiser in denoisers:
                if merge_method(denoiser) == "dit":
                    handles.append(patch_dit(denoiser, DitMergeSettings(
                        ratio=self.ratio,
                        window=self.window,
                        skip_first_blocks=self.skip_first_blocks,
                        skip_last_blocks=self.skip_last_blocks,
                        attention_impl=self.attention_impl,
                    )))
                else:
                    handles.append(patch_unet(denoiser, UnetMergeSettings(ratio=self.ratio)))
        except BaseException:
            for h in reversed(handles):
                h.detach()
            raise
        active = step_active(0, run.steps, self.start_percent, self.end_percent)
        for h in handles:
            h.set_active(active)
        self._handles.extend(handles)

        def detach() -> None:
            for h in reversed(handles):
                h.detach()
                if h in self._handles:
                    self._handles.remove(h)

        return detach

    def on_step(self, step: int, total: int) -> None:
        if not self._handles:
            return
        active = step_active(step, total, self.start_percent, self.end_percent)
        for h in self._handles:
            h.set_active(active)
