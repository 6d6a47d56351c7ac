"""VRAMWiseLoraLoader: a LoRA from ComfyUI's loras folder, applied while sampling (chain several)."""

from __future__ import annotations

from ..vramwise.handles import VramwiseModel
from ..vramwise.lora import LoraEntry, with_lora
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseModelType

LORA_FOLDER = "loras"


class VRAMWiseLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseLoraLoader",
            display_name="VRAMWise LoRA",
            category=CATEGORY,
            description=(
                "Applies a Wan LoRA (ComfyUI/original, musubi/kohya or diffusers naming, incl. the lightx2v "
                "step/CFG distill and CausVid files) while sampling. Chain several. The loaded model is not "
                "changed: a new strength, or removing the node, needs no reload. Distill LoRAs run with few "
                "steps at cfg 1 (lightx2v: 4 steps, cfg 1, shift 5, scheduler flow_euler or unipc)."
            ),
            inputs=[
                VramwiseModelType.Input("model", tooltip="From a VRAMWise loader (or another LoRA / Token Merge node)."),
                io.Combo.Input("lora_name", options=comfy.list_files(LORA_FOLDER),
                               tooltip="A .safetensors LoRA under models/loras (or extra_model_paths.yaml loras:)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, round=0.001,
                               tooltip="LoRA strength (0 = off exactly). Wan2.2 A14B: the high-noise expert."),
                io.Float.Input("strength_low_noise", default=1.0, min=-10.0, max=10.0, step=0.01, round=0.001,
                               tooltip="Wan2.2 A14B only: strength on the low-noise expert (0 = not applied "
                                       "there). Ignored by single-expert models."),
            ],
            outputs=[VramwiseModelType.Output(display_name="model", tooltip="The model with this LoRA added.")],
        )

    @classmethod
    def execute(cls, model: VramwiseModel, lora_name: str, strength: float,
                strength_low_noise: float = 1.0) -> io.NodeOutput:
        # Resolved only through the listing (no absolute paths, no '..'), as every file input is.
        entry = LoraEntry(comfy.model_file("lora_name", LORA_FOLDER, lora_name), float(strength),
                          float(strength_low_noise))
        patched = with_lora(model, entry)
        patch = next(p for p in patched.patches if p.name == "lora")
        # Matching now makes a LoRA for another model (or a family without LoRA support) fail at this node.
        lines = patch.validate(patched)
        return io.NodeOutput(patched, ui=comfy.ui.PreviewText("\n".join(lines) or patch.describe()))
