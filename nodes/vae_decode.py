"""VRAMWiseVAEDecode: latents to IMAGE frames, tiled when the untiled decode would not fit."""

from __future__ import annotations

from ..vramwise.decode import TilingMode, TilingOptions, decode_latents
from ..vramwise.handles import VramwiseLatent, VramwiseModel
from ..vramwise.loader import CACHE
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseLatentType, VramwiseModelType


class VRAMWiseVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseVAEDecode",
            display_name="VRAMWise VAE Decode (video frames)",
            category=CATEGORY,
            description="Decodes the sampler's latents into frames that chain with any image node.",
            inputs=[
                VramwiseModelType.Input("model", tooltip="The same model the sampler used (its VAE decodes)."),
                VramwiseLatentType.Input("latent", tooltip="From VRAMWise Sampler."),
                io.Combo.Input(
                    "tiling", options=[m.value for m in TilingMode], default=TilingMode.AUTO.value,
                    tooltip="auto: tile only when the untiled decode would not fit in free memory. on/off: force it. "
                    "Tiles use far less memory but can show faint seams.",
                ),
                io.Int.Input("tile_size", default=256, min=64, max=2048, step=32,
                             tooltip="Tile edge in pixels when tiling."),
                io.Int.Input("tile_overlap", default=64, min=0, max=1024, step=16,
                             tooltip="Pixels neighbouring tiles share and blend, hiding seams. Smaller than tile_size."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="[frames, height, width, 3] images, 0..1."),
                # FLOAT, like the writer's and core CreateVideo's fps, so it links (TI2V-5B: 24, EasyAnimate: 8).
                # Workflows saved when it was INT still load: the server checks links against this schema.
                io.Float.Output(display_name="fps", tooltip="The frame rate the model was trained for; link it to the writer's fps."),
            ],
        )

    @classmethod
    def execute(
        cls, model: VramwiseModel, latent: VramwiseLatent, tiling: str, tile_size: int, tile_overlap: int
    ) -> io.NodeOutput:
        if model.loaded.released:
            CACHE.revive(model.loaded, before_load=comfy.free_comfyui_models)
        options = TilingOptions(TilingMode.parse(tiling), tile_size, tile_overlap)
        frames, note = decode_latents(model, latent, options, check_cancel=comfy.check_interrupt)
        return io.NodeOutput(frames, float(latent.fps), ui=comfy.ui.PreviewText(note))
