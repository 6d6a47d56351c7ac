"""``StepCachePatch``: the ModelPatch that skips denoising steps by reusing the last computed result, for one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..architectures import architecture_of
from ..errors import InputError
from .easycache import EasyCacheRule
from .fixed import FixedRule
from .magcache import MagCacheRule
from .published import (
    EASYCACHE_END,
    EASYCACHE_START,
    EASYCACHE_THRESHOLD,
    MAGCACHE_K,
    MAGCACHE_RATIOS,
    MAGCACHE_THRESHOLD,
    TEACACHE_COEFFICIENTS,
    TEACACHE_THRESHOLD,
)
from .rule import Rule
from .teacache import TeaCacheRule, has_wan_time_embedder
from .wrapper import CacheRun

if TYPE_CHECKING:
    from ..handles import RunInfo, VramwiseModel

METHODS = ("easycache", "teacache", "magcache", "fixed")
CALIBRATED = ("teacache", "magcache")
# Denoisers the whole-step cache works on: the described transformer architectures (``vramwise.architectures``:
# Wan, EasyAnimate), flow-matching DiTs whose output lines up with the latent part of their input. I2VGen-XL's UNet
# predicts noise (epsilon, DDIM) instead of a flow velocity and none of these rules was published for it, so it
# is refused rather than guessed.
# Families with published TeaCache / MagCache calibrations (Wan2.1 I2V 14B, the 480P and the 720P checkpoint).
CALIBRATED_FAMILIES = ("wan2.1-i2v",)
MAX_CONSECUTIVE_SKIPS = 16
# 720P calibration when the run is at least this share of 1280x720 and the model's name says neither.
_720P_AREA = 0.75 * 1280 * 720


def wan21_variant(model: "VramwiseModel", run: "RunInfo") -> tuple[str, str]:
    """("480P" | "720P", why): from the model's folder or file name, else from the run's size."""
    name = str(getattr(model.loaded.options, "folder", "")).upper()
    for variant in ("720P", "480P"):
        if variant in name:
            return variant, "from the model name"
    guess = "720P" if run.width * run.height >= _720P_AREA else "480P"
    return guess, "from the run size (the model name says neither 480P nor 720P)"


@dataclass(eq=False)
class StepCachePatch:
    """Skip denoising steps whose result the rule predicts from the last computed one.

    ``threshold`` below 0 takes the method's published default, 0 turns the cache off exactly (nothing is attached).
    """

    method: str = "easycache"
    threshold: float = -1.0
    start_percent: float = EASYCACHE_START
    end_percent: float = EASYCACHE_END
    max_consecutive_skips: int = MAGCACHE_K
    name: str = "step_cache"
    _runs: list[CacheRun] = field(default_factory=list, repr=False, compare=False)
    last_counts: dict[str, tuple[int, int]] | None = field(default=None, repr=False, compare=False)
    _last_setting: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError("method", f"'{self.method}' is not a step-cache method.", f"pick one of {', '.join(METHODS)}.")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise InputError(
                "start_percent",
                f"start_percent {self.start_percent} and end_percent {self.end_percent} do not form a range in 0..1.",
                "use 0 <= start_percent <= end_percent <= 1.",
            )
        if not 1 <= self.max_consecutive_skips <= MAX_CONSECUTIVE_SKIPS:
            raise InputError("max_consecutive_skips", f"{self.max_consecutive_skips} is outside 1..{MAX_CONSECUTIVE_SKIPS}.",
                             f"use 1 to {MAX_CONSECUTIVE_SKIPS} (1 = never two skipped steps in a row).")

    @property
    def off(self) -> bool:
        return self.threshold == 0

    def threshold_for(self, variant: str | None) -> float:
        if self.threshold > 0:
            return float(self.threshold)
        if self.method == "teacache":
            return TEACACHE_THRESHOLD[variant or "480P"]
        if self.method == "magcache":
            return MAGCACHE_THRESHOLD
        return EASYCACHE_THRESHOLD

    def describe(self) -> str:
        if self.off:
            return "step cache: off (threshold 0)"
        thr = "published default" if self.threshold < 0 else f"{self.threshold:g}"
        if self.method == "fixed":
            thr = "ignored"
        return (
            f"step cache: {self.method}, threshold {thr}, steps {self.start_percent:g}-{self.end_percent:g}, "
            f"at most {self.max_consecutive_skips} skipped in a row"
        )

    def _make_rule(self, variant: str | None) -> Callable[[], Rule]:
        thr = self.threshold_for(variant)
        if self.method == "easycache":
            return lambda: EasyCacheRule(thr)
        if self.method == "teacache":
            coefficients = TEACACHE_COEFFICIENTS[variant]
            return lambda: TeaCacheRule(thr, coefficients)
        if self.method == "magcache":
            ratios = MAGCACHE_RATIOS[variant]
            return lambda: MagCacheRule(thr, ratios)
        return FixedRule

    def attach(self, model: "VramwiseModel", run: "RunInfo") -> Callable[[], None]:
        self.last_counts = None
        if self.off:
            self._last_setting = self.describe()
            return lambda: None
        loaded = model.loaded
        named = [(n, getattr(loaded.pipe, n)) for n in loaded.family.denoiser_names
                 if isinstance(getattr(loaded.pipe, n, None), torch.nn.Module)]
        unsupported = sorted({type(m).__name__ for _, m in named if architecture_of(m) is None})
        if unsupported or not named:
            raise InputError(
                "model",
                f"the step cache works on transformer denoisers (Wan, EasyAnimate); {model.family.label} has "
                f"{', '.join(unsupported) or 'no denoiser'}, for which no step-cache rule is known.",
                "remove the Step Cache node (or set threshold 0) for this model.",
            )
        variant, why = None, ""
        if self.method in CALIBRATED:
            if model.family.id not in CALIBRATED_FAMILIES:
                raise InputError(
                    "method",
                    f"{self.method} has published calibrations only for Wan2.1 I2V 14B (480P / 720P), not for "
                    f"{model.family.label}.",
                    "pick method easycache (needs no calibration) for this model.",
                )
            if self.method == "teacache" and not all(has_wan_time_embedder(m) for _, m in named):
                raise InputError("method", "teacache needs Wan's time embedder, which this denoiser lacks.",
                                 "pick method easycache.")
            variant, why = wan21_variant(model, run)
        cache_run = CacheRun(named, self._make_rule(variant), run.steps, self.start_percent, self.end_percent,
                             self.max_consecutive_skips)
        self._runs.append(cache_run)
        setting = self.describe()
        if variant is not None:
            setting += f"; {variant} calibration ({why}), threshold {self.threshold_for(variant):g}"
        elif self.method == "easycache":
            setting += f" (threshold {self.threshold_for(None):g})"
        if loaded.placement.cfg_batched and run.do_cfg:
            setting += "; CFG batched: one decision and one batch-2 forward per computed step"

        def detach() -> None:
            cache_run.detach()
            if cache_run in self._runs:
                self._runs.remove(cache_run)
            self.last_counts = cache_run.counts()
            self._last_setting = setting

        return detach

    def on_step(self, step: int, total: int) -> None:
        for r in self._runs:
            r.on_step(step, total)

    def run_note(self) -> str:
        """What the last run did, for the sampler's ``info``."""
        if self.off or self.last_counts is None:
            return self._last_setting or self.describe()
        per = "; ".join(f"{n}: {c} computed, {s} skipped" for n, (c, s) in self.last_counts.items())
        return f"{self._last_setting}: {per or 'no denoiser call'}"
