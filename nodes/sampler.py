"""VRAMWiseSampler: image (+ optional end frame) and prompt to latents, with progress, preview and Cancel."""

from __future__ import annotations

import torch

from ..vramwise.families import FAMILY_CLASSES
from ..vramwise.families.base import GenerationRequest
from ..vramwise.families.schedulers import SCHEDULERS
from ..vramwise.handles import VramwiseModel, patch_note
from ..vramwise.image_prep import ResizeMode, first_frame, fit_image
from ..vramwise.loader import CACHE
from ..vramwise.memory.planned_run import generate_with_plan
from ..vramwise.preview import latent_preview
from ..vramwise.validation import validate_generation
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY, VramwiseLatentType, VramwiseModelType


def _defaults_help(field: str) -> str:
    return "; ".join(f"{c.label}: {getattr(c.defaults, field)}" for c in FAMILY_CLASSES)


def _patch_line(patch) -> str:
    """A patch's own report of the run when it keeps one (LoRA: keys applied/ignored, how; step cache: steps
    computed and skipped, via ``run_note``), else its name."""
    report = getattr(patch, "report", None)
    return "\n".join(report) if report else patch_note(patch)


class _ComfyObserver:
    """Feeds the engine's step reports into ComfyUI's progress bar and its Cancel button."""

    def __init__(self, total: int, preview_format: str | None) -> None:
        self.progress = comfy.Progress(total)
        factors = comfy.latent_rgb_factors(preview_format) if comfy.previews_enabled() else None
        self.factors = factors

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        preview = None
        if self.factors is not None:
            preview = latent_preview(latents, self.factors[0], self.factors[1], comfy.preview_max_size())
        self.progress.update(step, total, preview)

    def check_cancel(self) -> None:
        comfy.check_interrupt()


class VRAMWiseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseSampler",
            display_name="VRAMWise Image to Video Sampler (Wan I2V / EasyAnimate / I2VGen-XL)",
            category=CATEGORY,
            description=(
                "Image to video (I2V): generates a video from a start image and a prompt with a Wan, EasyAnimate or I2VGen-XL model. Shows a progress bar per step and stops "
                "within one step on Cancel; GPU memory the run used is given back afterwards."
            ),
            inputs=[
                VramwiseModelType.Input("model", tooltip="From VRAMWise Model Loader (or Token Merge)."),
                io.Image.Input("image", tooltip="The first frame. With a batch, the first image is used."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What should happen in the video."),
                io.String.Input(
                    "negative_prompt", multiline=True, default="",
                    tooltip="What to avoid. Only used when cfg > 1.",
                ),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Output width in pixels. Multiple of 16 (32 for Wan2.2 TI2V-5B). Defaults: " + _defaults_help("width")),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Output height in pixels. Multiple of 16 (32 for Wan2.2 TI2V-5B). Defaults: " + _defaults_help("height")),
                io.Int.Input("num_frames", default=81, min=1, max=1025, step=4,
                             tooltip="Frames to generate. Wan and EasyAnimate: of the form 4k+1 (33, 49, 81); I2VGen-XL: any count (trained on 16). Defaults: " + _defaults_help("num_frames")),
                io.Int.Input("steps", default=30, min=0, max=200,
                             tooltip="Denoising steps (at least 1). Defaults: " + _defaults_help("steps")),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; 1.0 disables it (twice as fast). Defaults: " + _defaults_help("cfg")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed and settings give the same video."),
                io.Float.Input("shift", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Flow-matching timestep shift: higher spends more steps on coarse motion. Defaults: " + _defaults_help("shift")),
                io.Combo.Input("resize_mode", options=[m.value for m in ResizeMode], default=ResizeMode.CROP.value,
                               tooltip="crop: fill the frame and cut the overflow (centre). pad: keep the whole image with black bars."),
                io.Image.Input("end_image", optional=True,
                               tooltip="Optional last frame, for models that take one (Wan2.1 FLF2V, Wan2.2 A14B, EasyAnimate V5.1 InP)."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="offload_mode auto: GPU memory the run may use, in GiB. 0 = the free memory "
                                       "minus headroom_gb."),
                io.Float.Input("headroom_gb", default=1.0, min=0.0, max=64.0, step=0.25, optional=True,
                               tooltip="offload_mode auto: GPU memory left free for other programs when "
                                       "vram_budget_gb is 0."),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="default", optional=True,
                               tooltip="Wan: default = UniPC (the model's own). flow_euler, dpm++ (2nd order) and "
                                       "lcm (x0 re-noised each step) are what step/CFG-distill LoRAs are run with "
                                       "(lightx2v: 4 steps, cfg 1, shift 5). Other families: default only."),
                io.Float.Input("cfg_low_noise", default=-1.0, min=-1.0, max=30.0, step=0.1, round=0.01, optional=True,
                               tooltip="Wan2.2 A14B: cfg of the low-noise expert (-1 = same as cfg). Distill "
                                       "recipes run one expert at cfg 1. Ignored by other models."),
                io.Float.Input("boundary", default=0.0, min=0.0, max=0.999, step=0.005, round=0.001, optional=True,
                               tooltip="Wan2.2 A14B: switch to the low-noise expert when the timestep falls below "
                                       "this share of the schedule (0 = the model's own, 0.9 for I2V). Ignored by "
                                       "other models."),
            ],
            outputs=[
                VramwiseLatentType.Output(display_name="latent"),
                io.String.Output(display_name="info", tooltip="What was run: model, plan, notes."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: VramwiseModel,
        image: torch.Tensor,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        cfg: float,
        seed: int,
        shift: float,
        resize_mode: str,
        end_image: torch.Tensor | None = None,
        vram_budget_gb: float = 0.0,
        headroom_gb: float = 1.0,
        scheduler: str = "default",
        cfg_low_noise: float = -1.0,
        boundary: float = 0.0,
    ) -> io.NodeOutput:
        family = model.family
        validate_generation(
            family, width=width, height=height, num_frames=num_frames, steps=steps, cfg=cfg,
            has_end_image=end_image is not None,
        )
        mode = ResizeMode.parse(resize_mode)
        frame, note = first_frame(image, "image")
        notes = [note] if note else []
        end = None
        if end_image is not None:
            end_frame, end_note = first_frame(end_image, "end_image")
            end = fit_image(end_frame, width, height, mode)
            notes += [end_note] if end_note else []
        request = GenerationRequest(
            image=fit_image(frame, width, height, mode), prompt=prompt, negative_prompt=negative_prompt,
            width=width, height=height, num_frames=num_frames, steps=steps, cfg=cfg, seed=seed, shift=shift,
            end_image=end, scheduler=scheduler,
            cfg_low_noise=None if cfg_low_noise < 0 else float(cfg_low_noise),
            boundary=float(boundary) if boundary > 0 else None,
        )
        if model.loaded.released:
            CACHE.revive(model.loaded, before_load=comfy.free_comfyui_models)
        observer = _ComfyObserver(steps, family.preview_latent_format)
        latent, plan_notes = generate_with_plan(
            model, request, observer, vram_budget_gb, headroom_gb, free_others=comfy.free_comfyui_models
        )
        info = "\n".join(
            [f"{family.label}: {width}x{height}, {num_frames} frames, {steps} steps, cfg {cfg:g}, seed {seed}",
             f"device: {comfy.environment_name()}"]
            + ([f"scheduler: {scheduler}"] if scheduler != "default" else [])
            + plan_notes + model.loaded.notes + [_patch_line(p) for p in model.patches]
            + notes
        )
        return io.NodeOutput(latent, info, ui=comfy.ui.PreviewText(info))

