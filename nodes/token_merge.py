"""VRAMWiseTokenMerge: faster sampling by merging similar tokens in self-attention, for DiTs and I2VGen-XL."""

from __future__ import annotations

from ..vramwise.handles import VramwiseModel
from ..vramwise.token_merge import MAX_RATIO, WINDOWS, TokenMergePatch
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseModelType

_DIT = "Wan and EasyAnimate"


class VRAMWiseTokenMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseTokenMerge",
            display_name="VRAMWise Token Merge (Wan / EasyAnimate / I2VGen-XL)",
            category=CATEGORY,
            description=(
                "Speeds up sampling by letting self-attention look at fewer, merged tokens where neighbouring "
                f"tokens are alike. {_DIT}: keys/values of similar tokens are averaged in pairs within small windows "
                "of the video (every output token is still computed; the image frame is never merged). I2VGen-XL: "
                "tomesd on the spatial attention blocks. Higher ratio = faster, less detail. Merging needs a "
                "little more VRAM (stream offload, 81 frames 480p: ~3.7 -> ~4.8 GiB); under offload mode auto a "
                "run that would not fit with merging runs without it and says so. The loaded model is "
                "not changed: bypassing this node gives exactly the unmerged video."
            ),
            inputs=[
                VramwiseModelType.Input("model", tooltip="From VRAMWise Model Loader."),
                io.Float.Input(
                    "ratio", default=0.5, min=0.0, max=MAX_RATIO, step=0.05, round=0.01,
                    tooltip=(
                        "Share of the tokens merged away in each merged attention (0.5 = half the keys). "
                        "0 turns merging off exactly. Measured on an H100, Wan 14B 480x832x81, per forward: "
                        "0.25 = 1.07x faster, 0.5 = 1.24x, 0.75 = 1.4x, 0.9 = 1.5x (720p: 0.5 = 1.44x). "
                        "Higher ratios lose more fine detail and small motion."
                    ),
                ),
                io.Float.Input(
                    "start_percent", default=0.1, min=0.0, max=1.0, step=0.01, round=0.001,
                    tooltip=(
                        "Merge from this point of the denoising (0 = first step). The first steps lay out the "
                        "composition and motion; leaving them unmerged protects both."
                    ),
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01, round=0.001,
                    tooltip="Stop merging at this point of the denoising (1 = through the last step).",
                ),
                io.Int.Input(
                    "skip_first_blocks", default=2, min=0, max=64,
                    tooltip=f"{_DIT}: leave this many first transformer blocks unmerged. Ignored by I2VGen-XL.",
                ),
                io.Int.Input(
                    "skip_last_blocks", default=2, min=0, max=64,
                    tooltip=f"{_DIT}: leave this many last transformer blocks unmerged. Ignored by I2VGen-XL.",
                ),
                io.Combo.Input(
                    "window", options=list(WINDOWS), default="spatial+temporal",
                    tooltip=(
                        f"{_DIT}: where a token may find its merge partner. spatial: a 4x4 token patch of its "
                        "own frame. spatial+temporal: a 2x4 patch in two neighbouring latent frames (partners "
                        "across time for static areas). Ignored by I2VGen-XL."
                    ),
                ),
            ],
            outputs=[VramwiseModelType.Output(display_name="model", tooltip="The model with token merging applied.")],
        )

    @classmethod
    def execute(
        cls,
        model: VramwiseModel,
        ratio: float,
        start_percent: float,
        end_percent: float,
        skip_first_blocks: int,
        skip_last_blocks: int,
        window: str,
    ) -> io.NodeOutput:
        patch = TokenMergePatch(
            ratio=float(ratio),
            start_percent=float(start_percent),
            end_percent=float(end_percent),
            skip_first_blocks=int(skip_first_blocks),
            skip_last_blocks=int(skip_last_blocks),
            window=window,
        )
        return io.NodeOutput(model.with_patch(patch), ui=comfy.ui.PreviewText(patch.describe()))
