"""Step caching for the video denoisers (no ComfyUI imports): skip a denoising step by reusing the last result.

* Rules, one per file: ``easycache`` (model-agnostic, the default), ``teacache`` and ``magcache`` (published
  calibrations for Wan2.1 I2V 14B), ``fixed`` (a schedule for tests and the benchmark); ``published`` holds every
  coefficient and default with its source.
* ``state``: one expert's decision state and cached results; ``wrapper``: the whole-forward wrapper and the per-run
  coordinator; ``patch``: ``StepCachePatch``, the ModelPatch the node adds.
"""

from .patch import CALIBRATED_FAMILIES, MAX_CONSECUTIVE_SKIPS, METHODS, StepCachePatch
from .wrapper import CacheRun, in_window

__all__ = ["CALIBRATED_FAMILIES", "CacheRun", "MAX_CONSECUTIVE_SKIPS", "METHODS", "StepCachePatch", "in_window"]
