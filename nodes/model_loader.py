"""VRAMWiseModelLoader: a diffusers image-to-video folder, loaded once and placed for the chosen offload mode."""

from __future__ import annotations

from ..vramwise.families import FAMILY_CLASSES
from ..vramwise.handles import VramwiseModel
from ..vramwise.loader import CACHE, LoadOptions
from ..vramwise.model_folders import list_model_folders, resolve_model_folder
from ..vramwise.offload import DESCRIPTIONS, OffloadMode
from ..vramwise.precision import WeightDtype
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseModelType

_MODES_HELP = "\n".join(f"{m.value}: {d}" for m, d in DESCRIPTIONS.items())
_FAMILIES_HELP = "; ".join(c.label for c in FAMILY_CLASSES)


def loader_fingerprint(**inputs) -> tuple:
    """Loader inputs plus the cache generation: after an unload ComfyUI's cached output would point at released
    weights, so a changed generation makes it run the loader again."""
    return tuple(sorted((k, str(v)) for k, v in inputs.items())) + (CACHE.generation,)


class VRAMWiseModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseModelLoader",
            display_name="VRAMWise Model Loader (Wan / EasyAnimate / I2VGen-XL image to video)",
            category=CATEGORY,
            description=(
                "Loads an image-to-video (I2V) model - Wan2.1/Wan2.2 I2V, TI2V-5B, EasyAnimate V5.1 InP, I2VGen-XL - from a diffusers folder under models/diffusers and places it on "
                "the GPU according to the offload mode. The same settings reuse the loaded model between runs."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=list_model_folders(comfy.diffusers_roots()),
                    tooltip=(
                        "A diffusers folder (holding model_index.json) under models/diffusers or a path from "
                        f"extra_model_paths.yaml. Supported: {_FAMILIES_HELP}."
                    ),
                ),
                io.Combo.Input(
                    "offload_mode",
                    options=[m.value for m in OffloadMode],
                    default=OffloadMode.AUTO.value,
                    tooltip="Where weights live between uses.\n" + _MODES_HELP,
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=[d.value for d in WeightDtype],
                    default=WeightDtype.BF16.value,
                    tooltip=(
                        "bf16: the models' native precision. fp16: only for GPUs without bf16 (may overflow). "
                        "fp8_e4m3fn: weights stored in fp8 (half the memory), computed in bf16; norms and "
                        "embeddings stay bf16."
                    ),
                ),
                io.Boolean.Input(
                    "text_encoder_on_cpu",
                    default=False,
                    tooltip="Run the text encoder (UMT5-XXL for Wan, ~11 GB) on the CPU: slower prompts, no VRAM used.",
                ),
                io.Combo.Input(
                    "compile",
                    options=["auto", "on", "off"],
                    default="auto",
                    # Optional so API prompts written before this input existed keep working.
                    optional=True,
                    tooltip=(
                        "Regional torch.compile of the denoiser blocks (offload_mode stream, and auto when it "
                        "picks stream): ~15-25% faster steps and a lower peak; the first run at each new size "
                        "spends ~20-60 s compiling. auto: on when a CUDA GPU and Triton are available, else off."
                    ),
                ),
            ],
            outputs=[VramwiseModelType.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> tuple:
        return loader_fingerprint(**kwargs)

    @classmethod
    def execute(cls, model: str, offload_mode: str, weight_dtype: str, text_encoder_on_cpu: bool,
                compile: str = "auto") -> io.NodeOutput:
        options = LoadOptions(
            folder=resolve_model_folder(model, comfy.diffusers_roots()),
            offload_mode=OffloadMode.parse(offload_mode),
            weight_dtype=WeightDtype.parse(weight_dtype),
            text_encoder_on_cpu=bool(text_encoder_on_cpu),
        )
        slot = str(cls.hidden.unique_id) if cls.hidden is not None else "default"
        loaded, reused = CACHE.get_or_load(slot, options, comfy.torch_device(), before_load=comfy.free_comfyui_models)
        compile_note = loaded.placement.set_compile(compile)  # kept there: re-applied when the model reloads
        text = "\n".join(loaded.notes + ([compile_note] if compile_note else [])
                         + (["(reused the loaded model)"] if reused else []))
        return io.NodeOutput(VramwiseModel(loaded), ui=comfy.ui.PreviewText(text))
