"""VRAMWiseStepCache: faster sampling by skipping denoising steps whose result is predictable from the last one."""

from __future__ import annotations

from ..vramwise.handles import VramwiseModel
from ..vramwise.step_cache import MAX_CONSECUTIVE_SKIPS, METHODS, StepCachePatch
from ..vramwise.step_cache.published import EASYCACHE_END, EASYCACHE_START, MAGCACHE_K
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseModelType


class VRAMWiseStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseStepCache",
            display_name="VRAMWise Step Cache",
            category=CATEGORY,
            description=(
                "Speeds up sampling by skipping denoising steps: when the rule predicts that a step would change "
                "the result little, the last computed result is reused (shifted by the new input) instead of "
                "running the model. A skipped step costs almost nothing, and with stream offload it also streams "
                "no weights. Wan and EasyAnimate; not I2VGen-XL. The sampler's info says how many steps each model "
                "computed and skipped. The loaded model is not changed: bypassing this node, or threshold 0, gives "
                "exactly the uncached video."
            ),
            inputs=[
                VramwiseModelType.Input("model", tooltip="From VRAMWise Model Loader or Checkpoint Loader."),
                io.Combo.Input(
                    "method", options=list(METHODS), default="easycache",
                    tooltip=(
                        "easycache: predicts the output change from the input change, no calibration, any Wan or "
                        "EasyAnimate model (ComfyUI core's EasyCache rule). teacache / magcache: the published "
                        "calibrations for Wan2.1 I2V 14B 480P and 720P only (TeaCache: 1.93x-2.64x on Wan2.1 720p, "
                        "H100; MagCache: ~1.75-1.9x). fixed: skip every step the window and max_consecutive_skips "
                        "allow (for tests and benchmarks, not quality)."
                    ),
                ),
                io.Float.Input(
                    "threshold", default=-1.0, min=-1.0, max=10.0, step=0.01, round=0.001,
                    tooltip=(
                        "How much estimated change may pile up before a step is computed again: higher = more "
                        "steps skipped, less faithful. -1 = the method's published default (easycache 0.2; "
                        "teacache 480P 0.19 of 0.13/0.19/0.26, 720P 0.2 of 0.18/0.2/0.3; magcache 0.12). "
                        "0 = off, exactly the uncached result."
                    ),
                ),
                io.Float.Input(
                    "start_percent", default=EASYCACHE_START, min=0.0, max=1.0, step=0.01, round=0.001,
                    tooltip=(
                        "No step before this point of the denoising is skipped: the first steps lay out "
                        "composition and motion. Default 0.15 as ComfyUI's EasyCache; magcache also always "
                        "computes its first 20% and teacache its first and last step."
                    ),
                ),
                io.Float.Input(
                    "end_percent", default=EASYCACHE_END, min=0.0, max=1.0, step=0.01, round=0.001,
                    tooltip="No step from this point on is skipped (the last steps set fine detail). Default 0.95.",
                ),
                io.Int.Input(
                    "max_consecutive_skips", default=MAGCACHE_K, min=1, max=MAX_CONSECUTIVE_SKIPS,
                    tooltip=(
                        "Never skip more steps than this in a row (MagCache's K, default 2). With method fixed, "
                        "1 computes every other step inside the window."
                    ),
                ),
            ],
            outputs=[VramwiseModelType.Output(display_name="model", tooltip="The model with the step cache applied.")],
        )

    @classmethod
    def execute(
        cls,
        model: VramwiseModel,
        method: str,
        threshold: float,
        start_percent: float,
        end_percent: float,
        max_consecutive_skips: int,
    ) -> io.NodeOutput:
        patch = StepCachePatch(
            method=method,
            threshold=float(threshold),
            start_percent=float(start_percent),
            end_percent=float(end_percent),
            max_consecutive_skips=int(max_consecutive_skips),
        )
        return io.NodeOutput(model.with_patch(patch), ui=comfy.ui.PreviewText(patch.describe()))
