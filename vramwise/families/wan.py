"""Wan image-to-video: Wan2.1 I2V (480P/720P), Wan2.1 FLF2V, Wan2.2 I2V-A14B (two experts), Wan2.2 TI2V-5B."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..prompt_cache import encode_prompts
from .base import Family, FamilyDefaults, GenerationRequest, ModelIndex
from .schedulers import build_scheduler

if TYPE_CHECKING:
    from ..handles import LoadedPipeline

PIPELINE = "WanImageToVideoPipeline"
# The hub's Wan2.2-TI2V-5B-Diffusers folder names the text-to-video pipeline (its weights do both); diffusers runs
# its image path through WanImageToVideoPipeline with the same components and expand_timesteps.
T2V_PIPELINE = "WanPipeline"
# The Wan attention processor hard-codes 512 text tokens when it splits image from text tokens; any other
# length silently gives the image branch no tokens.
MAX_TEXT_TOKENS = 512
# Decode peak measured for the full Wan VAE (base_dim 96, bf16): 4.62 GiB for one 480x832 clip; the causal
# decoder works a few frames at a time, so the peak scales with pixels per frame, not with frame count.
_DECODE_BYTES_PER_PIXEL_FULL = 4.62 * 2**30 / (480 * 832)
_FULL_BASE_DIM = 96
# Each pipeline's scheduler as loaded: every run builds its scheduler choice from this one, so switching back to
# "default" after flow_euler gives UniPC again. Keyed weakly by the pipeline (dropped with it).
_LOADED_SCHEDULER: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class _WanFamily(Family):
    pipeline_class_name = PIPELINE
    loads_fp8_directly = True
    text_encoder_unread_at_load = True
    text_encoder_names = ("text_encoder",)
    preview_latent_format = "Wan21"
    # WanTransformer3DModel._cp_plan splits the video tokens at blocks.0 and gathers them at proj_out.
    supports_context_parallel = True

    def load(self, folder: Path, torch_dtype: torch.dtype, fp8_skip: tuple[str, ...] | None = None,
             unread_blocks: tuple[str, ...] = (), unread_text_encoder: bool = False) -> Any:
        from diffusers import WanImageToVideoPipeline

        from ..weight_loading import load_denoisers

        # The denoisers (nearly all the bytes) are read tensor by tensor into their final dtype (weight_loading.py);
        # the blocks of those named in ``unread_blocks`` stay unread (the one-expert plan fills them later).
        parts = load_denoisers(folder, self.denoiser_names, torch_dtype, fp8_skip, unread_blocks)
        if unread_text_encoder:
            # UMT5-XXL (~11 GB) is built from its config, its weights read when a prompt is first encoded
            # (under ``stream`` leaf by leaf from the files): measured on an H100 (2026-12-06), reading it at load
            # through from_pretrained made the load peak 31.7 GiB against 21.5 GiB once loaded.
            te = _unread_text_encoder(folder, torch_dtype)
            if te is not None:
                parts["text_encoder"] = te
        return WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch_dtype, **parts)

    def latent_factors(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)

    def configure_scheduler(self, pipe: Any, request: GenerationRequest) -> None:
        base = _LOADED_SCHEDULER.setdefault(pipe, pipe.scheduler)
        if request.scheduler == "default" and pipe.scheduler is base:
            config = base.config
            if "flow_shift" in config and float(config["flow_shift"]) == float(request.shift):
                return
        pipe.scheduler = build_scheduler(request.scheduler, base, request.shift)

    def _expert_settings(self, pipe: Any, request: GenerationRequest) -> tuple[dict[str, Any], float | None]:
        """(extra pipeline arguments, boundary_ratio for this run) for Wan2.2 A14B's two experts."""
        two = getattr(pipe, "transformer_2", None) is not None and pipe.config.get("boundary_ratio") is not None
        if not two:
            return {}, None
        kwargs: dict[str, Any] = {}
        if request.cfg_low_noise is not None:
            if request.cfg_low_noise > 1.0 and request.cfg <= 1.0:
                raise InputError(
                    "cfg_low_noise", f"{request.cfg_low_noise:g} needs the negative prompt, which diffusers runs only "
                    f"when cfg (the high-noise expert's) is above 1 (it is {request.cfg:g}).",
                    "set cfg above 1, or cfg_low_noise to 1 (or -1: same as cfg).")
            kwargs["guidance_scale_2"] = float(request.cfg_low_noise)
        boundary = None
        if request.boundary is not None:
            if not 0.0 < request.boundary < 1.0:
                raise InputError("boundary", f"{request.boundary:g} is outside 0..1.",
                                 "use a value between 0 and 1 (0 = the model's own, 0.9 for I2V A14B).")
            boundary = float(request.boundary)
        return kwargs, boundary

    def sample(self, loaded: "LoadedPipeline", request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        pipe = loaded.pipe
        extra, boundary = self._expert_settings(pipe, request)
        do_cfg = request.cfg > 1.0
        # Prompts are encoded here rather than inside the pipeline so the text encoder may live on another
        # device (text_encoder_on_cpu) than the denoiser.
        # Cached by prompt and settings: a re-run of the same prompt skips the text encoder (prompt_cache.py).
        prompt_embeds, negative_embeds = encode_prompts(
            loaded, request.prompt, request.negative_prompt, do_cfg, MAX_TEXT_TOKENS,
            lambda: pipe.encode_prompt(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                do_classifier_free_guidance=do_cfg,
                max_sequence_length=MAX_TEXT_TOKENS,
                device=loaded.text_device,
            ),
        )
        if negative_embeds is not None:
            # Lets the stream engine batch both CFG passes from the very first step.
            for batcher in loaded.placement.cfg_batchers:
                batcher.set_negative(negative_embeds.to(loaded.device))
        kwargs: dict[str, Any] = dict(
            image=request.image,
            prompt_embeds=prompt_embeds.to(loaded.device),
            negative_prompt_embeds=negative_embeds.to(loaded.device) if negative_embeds is not None else None,
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            generator=generator,
            output_type="latent",
            max_sequence_length=MAX_TEXT_TOKENS,
        )
        if request.end_image is not None:
            kwargs["last_image"] = request.end_image
        kwargs.update(extra)
        if boundary is None:
            return pipe(**kwargs).frames
        # The switch point is pipeline config in diffusers; set for this run only and put back.
        loaded_boundary = pipe.config.boundary_ratio
        pipe.register_to_config(boundary_ratio=boundary)
        try:
            return pipe(**kwargs).frames
        finally:
            pipe.register_to_config(boundary_ratio=loaded_boundary)

    def decode(self, loaded: "LoadedPipeline", latents: torch.Tensor) -> torch.Tensor:
        vae = loaded.pipe.vae
        z = vae.config.z_dim
        latents = latents.to(loaded.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, z, 1, 1, 1)
        with torch.no_grad():
            video = vae.decode(latents * std + mean, return_dict=False)[0]
        # [1, 3, F, H, W] in -1..1 -> [F, H, W, 3] in 0..1
        frames = ((video[0].float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 3, 0)
        return frames.contiguous().cpu()

    def decode_bytes_per_pixel(self, loaded: "LoadedPipeline") -> float:
        vae = loaded.pipe.vae
        base_dim = float(vae.config.get("base_dim", _FULL_BASE_DIM))
        elem = torch.tensor([], dtype=vae.dtype).element_size()
        return _DECODE_BYTES_PER_PIXEL_FULL * (base_dim / _FULL_BASE_DIM) * (elem / 2.0)


def _unread_text_encoder(folder: Path, torch_dtype: torch.dtype) -> Any:
    """The folder's transformers text encoder with no weight read, or None (load it as usual)."""
    import transformers

    from ..encoder_weights import unread_encoder

    try:
        with open(folder / "model_index.json", encoding="utf-8") as f:
            library, name = json.load(f)["text_encoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cls = getattr(transformers, name, None) if library == "transformers" else None
    return unread_encoder(cls, folder / "text_encoder", torch_dtype) if cls is not None else None


def _transformer_config(index: ModelIndex) -> dict[str, Any]:
    return index.component_config("transformer")


class Wan21I2V(_WanFamily):
    id = "wan2.1-i2v"
    label = "Wan2.1 I2V 14B (480P/720P)"
    defaults = FamilyDefaults(width=832, height=480, num_frames=81, steps=40, cfg=5.0, shift=3.0, fps=16)

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        return (
            index.pipeline_class == PIPELINE
            and index.has_component("image_encoder")
            and not index.has_component("transformer_2")
            and _transformer_config(index).get("pos_embed_seq_len") is None
        )


class Wan21FLF2V(_WanFamily):
    id = "wan2.1-flf2v"
    label = "Wan2.1 FLF2V 14B (first-last frame)"
    defaults = FamilyDefaults(width=1280, height=720, num_frames=81, steps=40, cfg=5.0, shift=5.0, fps=16)
    supports_end_image = True

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        return (
            index.pipeline_class == PIPELINE
            and index.has_component("image_encoder")
            and _transformer_config(index).get("pos_embed_seq_len") is not None
        )


class Wan22I2VA14B(_WanFamily):
    id = "wan2.2-i2v-a14b"
    label = "Wan2.2 I2V A14B (two experts)"
    defaults = FamilyDefaults(width=832, height=480, num_frames=81, steps=40, cfg=3.5, shift=5.0, fps=16)
    supports_end_image = True
    denoiser_names = ("transformer", "transformer_2")

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        return index.pipeline_class == PIPELINE and index.has_component("transformer_2")


class Wan22TI2V5B(_WanFamily):
    id = "wan2.2-ti2v-5b"
    label = "Wan2.2 TI2V 5B"
    defaults = FamilyDefaults(width=1280, height=704, num_frames=121, steps=50, cfg=5.0, shift=5.0, fps=24)
    # 16x spatial VAE compression times a 2x2 patch
    size_multiple = 32
    preview_latent_format = "Wan22"

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        # The published folder says WanPipeline, so the class name alone cannot tell it from Wan2.1 T2V or
        # Wan2.2 T2V-A14B (also WanPipeline): the configs do. TI2V-5B conditions by replacing the first latent
        # frame (expand_timesteps) with the image's VAE latent, so its transformer reads and writes exactly
        # the VAE's channels (48); the T2V models have expand_timesteps false (or absent) and 16 channels.
        if index.pipeline_class not in (PIPELINE, T2V_PIPELINE) or index.has_component("transformer_2"):
            return False
        if not index.index.get("expand_timesteps"):
            return False
        transformer = _transformer_config(index)
        z_dim = index.component_config("vae").get("z_dim")
        return (
            transformer.get("image_dim") is None
            and transformer.get("in_channels") == transformer.get("out_channels") == z_dim
        )


def text_to_video_reason(index: ModelIndex) -> str | None:
    """Why a WanPipeline folder that is not TI2V-5B is refused, naming the configs that tell (None otherwise)."""
    if index.pipeline_class != T2V_PIPELINE or Wan22TI2V5B.matches(index):
        return None
    transformer = _transformer_config(index)
    experts = "two experts (Wan2.2 T2V-A14B)" if index.has_component("transformer_2") else "one transformer"
    return (
        f"a Wan text-to-video model ({T2V_PIPELINE}, {experts}, transformer in_channels "
        f"{transformer.get('in_channels')}, expand_timesteps {bool(index.index.get('expand_timesteps'))}); this pack "
        "needs an image-to-video model: Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B, or Wan2.2 TI2V-5B "
        "(Wan2.2-TI2V-5B-Diffusers)"
    )


WAN_FAMILIES: tuple[type[Family], ...] = (Wan22I2VA14B, Wan22TI2V5B, Wan21FLF2V, Wan21I2V)
