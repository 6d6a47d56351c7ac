"""VRAMWiseCheckpointLoader: a Wan image-to-video pipeline assembled from ComfyUI-format single files."""

from __future__ import annotations

from pathlib import Path

from ..vramwise.handles import VramwiseModel
from ..vramwise.loader import CACHE, LoadOptions
from ..vramwise.offload import OffloadMode
from ..vramwise.precision import WeightDtype
from ..vramwise.single_file import SingleFileSpec
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .model_loader import VRAMWiseModelLoader, loader_fingerprint
from .types import CATEGORY, VramwiseModelType

NONE = "none"
_MODEL_EXT = (".safetensors", ".gguf")
# ComfyUI folder names: diffusion_models covers models/diffusion_models and models/unet.
_FOLDERS = {
    "diffusion_model": ("diffusion_models", _MODEL_EXT),
    "diffusion_model_2": ("diffusion_models", _MODEL_EXT),
    # .gguf listed so a GGUF UMT5 a user put there is explained (refused with what to pick) rather than missing.
    "text_encoder": ("text_encoders", (".safetensors", ".gguf")),
    "clip_vision": ("clip_vision", (".safetensors",)),
    "vae": ("vae", (".safetensors",)),
}
# In the model loader's order; compile is appended there too (optional), so saved workflows keep their positions.
_SHARED_INPUTS = ("offload_mode", "weight_dtype", "text_encoder_on_cpu", "compile")


def _options(input_name: str, optional_none: bool = False) -> list[str]:
    folder, ext = _FOLDERS[input_name]
    files = comfy.list_files(folder, ext)
    return [NONE, *files] if optional_none else files


def _shared_inputs() -> list:
    """The model loader's offload/precision inputs, same options, defaults and tooltips."""
    inputs = VRAMWiseModelLoader.define_schema().inputs
    return [i for i in inputs if getattr(i, "id", None) in _SHARED_INPUTS]


def _resolve(input_name: str, value: str | None, optional: bool = False) -> Path | None:
    if optional and (value is None or value == NONE):
        return None
    folder, ext = _FOLDERS[input_name]
    return comfy.model_file(input_name, folder, value, ext)


class VRAMWiseCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseCheckpointLoader",
            display_name="VRAMWise Checkpoint Loader (Wan I2V single files)",
            category=CATEGORY,
            description=(
                "Assembles a Wan image-to-video model from ComfyUI's single files (diffusion model, UMT5 text "
                "encoder, CLIP vision, VAE) - bf16/fp16, fp8, fp8_scaled or GGUF - and places it like the model loader."
            ),
            inputs=[
                io.Combo.Input(
                    "diffusion_model",
                    options=_options("diffusion_model"),
                    tooltip=(
                        "Wan2.1 I2V/FLF2V 14B, Wan2.2 I2V-A14B high-noise expert, or Wan2.2 TI2V-5B (models/diffusion_models "
                        "or models/unet): .safetensors (bf16, fp16, fp8_e4m3fn, fp8_scaled) or .gguf (F16, Q8_0, Q4_K...)."
                    ),
                ),
                io.Combo.Input(
                    "diffusion_model_2",
                    options=_options("diffusion_model_2", optional_none=True),
                    default=NONE,
                    tooltip="Wan2.2 I2V-A14B only: the low-noise expert. none for every other model.",
                ),
                io.Combo.Input("text_encoder", options=_options("text_encoder"), tooltip="umt5_xxl_fp16 or umt5_xxl_fp8_e4m3fn_scaled (models/text_encoders). GGUF text encoders are refused."),
                io.Combo.Input(
                    "clip_vision",
                    options=_options("clip_vision", optional_none=True),
                    default=NONE,
                    tooltip="clip_vision_h.safetensors for Wan2.1 I2V/FLF2V; none for Wan2.2.",
                ),
                io.Combo.Input("vae", options=_options("vae"), tooltip="wan_2.1_vae.safetensors (Wan2.1 and Wan2.2 A14B) or wan2.2_vae.safetensors (Wan2.2 TI2V-5B) (models/vae)."),
                *_shared_inputs(),
            ],
            outputs=[VramwiseModelType.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> tuple:
        return loader_fingerprint(**kwargs)

    @classmethod
    def execute(
        cls,
        diffusion_model: str,
        text_encoder: str,
        vae: str,
        offload_mode: str,
        weight_dtype: str,
        text_encoder_on_cpu: bool,
        diffusion_model_2: str = NONE,
        clip_vision: str = NONE,
        compile: str = "auto",
    ) -> io.NodeOutput:
        spec = SingleFileSpec.create(
            diffusion_model=_resolve("diffusion_model", diffusion_model),
            diffusion_model_2=_resolve("diffusion_model_2", diffusion_model_2, optional=True),
            text_encoder=_resolve("text_encoder", text_encoder),
            clip_vision=_resolve("clip_vision", clip_vision, optional=True),
            vae=_resolve("vae", vae),
        )
        options = LoadOptions(
            folder=spec.diffusion_model,
            offload_mode=OffloadMode.parse(offload_mode),
            weight_dtype=WeightDtype.parse(weight_dtype),
            text_encoder_on_cpu=bool(text_encoder_on_cpu),
            source=spec,
        )
        slot = str(cls.hidden.unique_id) if cls.hidden is not None else "default"
        loaded, reused = CACHE.get_or_load(slot, options, comfy.torch_device(), before_load=comfy.free_comfyui_models)
        compile_note = loaded.placement.set_compile(compile)  # kept there: re-applied when the model reloads
        text = "\n".join(loaded.notes + ([compile_note] if compile_note else [])
                         + (["(reused the loaded model)"] if reused else []))
        return io.NodeOutput(VramwiseModel(loaded), ui=comfy.ui.PreviewText(text))
