"""I2VGen-XL: a 3-D UNet over per-frame SD-style latents, conditioned on the prompt, the image and a target fps.

Published settings (diffusers' I2VGenXLPipeline defaults and docs example, ali-vilab/i2vgen-xl): 1280x704,
16 frames, 50 DDIM steps, cfg 9.0, target_fps 16. The pipeline is deprecated in diffusers (last maintained
0.33.1) but still importable; it has no step callback and no interrupt flag, which sampling.py covers by
wrapping ``scheduler.step`` and pre-hooking the UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..prompt_cache import encode_prompts
from .base import Family, FamilyDefaults, GenerationRequest, ModelIndex
from .easyanimate import untiled_encode

if TYPE_CHECKING:
    from ..handles import LoadedPipeline

PIPELINE = "I2VGenXLPipeline"
# Frames decoded per VAE call: the pipeline's own default (decode_chunk_size=1), the lowest-memory choice; the
# 2-D SD VAE gains little from larger batches on a GPU.
DECODE_CHUNK_FRAMES = 1
# Peak bytes per output pixel of one frame when the SD-sized AutoencoderKL decoder (block_out_channels
# [128, 256, 512, 512], 2 layers per block) decodes one frame in bf16, measured on an H200: 2.04 GiB for one
# 1280x704 frame, 8.17 GiB for one 2560x1408 frame (~2,430 bytes per pixel). The full-resolution up block
# dominates, so it scales with block_out_channels[0].
_DECODE_BYTES_PER_PIXEL_FULL = 2_450.0
_FULL_FIRST_CHANNELS = 128


class I2VGenXL(Family):
    id = "i2vgenxl"
    label = "I2VGen-XL"
    pipeline_class_name = PIPELINE
    # shift is not used (DDIM); kept at 1.0 so the defaults line reads as "no shift".
    defaults = FamilyDefaults(width=1280, height=704, num_frames=16, steps=50, cfg=9.0, shift=1.0, fps=16)
    # The pipeline checks multiples of 8 (the VAE factor); the UNet forwards upsample sizes for latents that its
    # down-sampling does not divide evenly.
    size_multiple = 8
    # No temporal compression: every frame has its own latent, so any frame count >= 1 is valid. It was trained
    # on 16-frame clips; far longer clips are accepted but drift.
    temporal_factor = 1
    max_frames = 128
    supports_end_image = False
    denoiser_names = ("unet",)
    text_encoder_names = ("text_encoder",)
    # 4-channel latents scaled by the SD VAE's 0.18215, laid out [B, 4, F, h, w]: ComfyUI's SD15 factors fit.
    preview_latent_format = "SD15"
    # Kept in bf16 under fp8 storage besides the generic patterns: the image-conditioning path, the fps and
    # context embedders and the first temporal transformer that sees conv_in's output.
    fp8_skip_patterns = ("fps_embedding", "context_embedding", "image_latents", "transformer_in")
    # Offload modes this family refuses (the loader raises an InputError naming offload_mode), with the reason.
    unsupported_offload_modes = {
        "stream": (
            "stream offload streams a model's repeated transformer blocks, and this UNet has none (its down, mid "
            "and up blocks all differ and do not run in the order they are stored); its ~1.4B-parameter UNet fits "
            "a few GB, so model or group offload cost little"
        ),
    }

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        return index.pipeline_class == PIPELINE

    def load(self, folder: Path, torch_dtype: torch.dtype) -> Any:
        import warnings

        from diffusers import I2VGenXLPipeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = I2VGenXLPipeline.from_pretrained(folder, dtype=torch_dtype)
        pipe.vae.disable_slicing()
        # ComfyUI shows its own per-step progress; the pipeline's tqdm bar would only clutter the console.
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latent_factors(self, pipe: Any) -> tuple[int, int]:
        # A 2-D VAE applied per frame: no temporal compression.
        return int(pipe.vae_scale_factor), 1

    def _encode(self, loaded: "LoadedPipeline", texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings from the penultimate layer, passed through the final layer norm.

        That is what I2VGen-XL was trained with (the pipeline's default clip_skip=1). The pipeline's own
        clip_skip path reaches ``text_encoder.text_model.final_layer_norm``, which CLIPTextModel no longer has
        in transformers >= 5.6, so the prompts are encoded here and handed over as embeddings.
        """
        pipe = loaded.pipe
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        device = loaded.text_device
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        out = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        final_norm = getattr(encoder, "final_layer_norm", None)
        if final_norm is None:
            final_norm = encoder.text_model.final_layer_norm
        return final_norm(out.hidden_states[-2])

    def sample(self, loaded: "LoadedPipeline", request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        pipe = loaded.pipe
        do_cfg = request.cfg > 1.0
        with torch.no_grad():
            texts = [request.prompt] + ([request.negative_prompt] if do_cfg else [])
            embeds = encode_prompts(loaded, request.prompt, request.negative_prompt, do_cfg, pipe.tokenizer.model_max_length,
                                    lambda: (self._encode(loaded, texts),))[0]  # cached: prompt_cache.py
            embeds = embeds.to(loaded.device, pipe.unet.dtype)
        kwargs: dict[str, Any] = dict(
            prompt=None,
            image=request.image,
            prompt_embeds=embeds[:1],
            height=request.height,
            width=request.width,
            target_fps=int(round(self.defaults.fps)),
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            generator=generator,
            output_type="latent",
            # Never let the pipeline encode anything itself (see _encode).
            clip_skip=None,
        )
        if do_cfg:
            kwargs["negative_prompt_embeds"] = embeds[1:]
        # The start image is VAE-encoded during the call: untiled, so the result does not depend on how the
        # previous clip was decoded.
        with untiled_encode(pipe.vae):
            return pipe(**kwargs).frames

    def vae_tiling(self, loaded: "LoadedPipeline", enabled: bool, tile: int, overlap: int) -> None:
        """AutoencoderKL.enable_tiling() takes no sizes: set its tile attributes directly.

        Its tiled decode steps through latents by tile_latent * (1 - overlap_factor) and crops decoded tiles to
        tile_sample * (1 - overlap_factor); both only agree (and the output only has the right size) when tile
        and overlap are whole multiples of the 8x VAE factor, so they are rounded down to those.
        """
        vae = loaded.pipe.vae
        if not enabled:
            vae.disable_tiling()
            return
        f = int(loaded.pipe.vae_scale_factor)
        tile_px = max(2 * f, (tile // f) * f)
        overlap_px = min((overlap // f) * f, tile_px - f)
        vae.tile_sample_min_size = tile_px
        vae.tile_latent_min_size = tile_px // f
        vae.tile_overlap_factor = overlap_px / tile_px
        vae.enable_tiling()

    def decode(self, loaded: "LoadedPipeline", latents: torch.Tensor) -> torch.Tensor:
        vae = loaded.pipe.vae
        latents = latents.to(loaded.device, vae.dtype) / float(vae.config.scaling_factor)
        # [1, C, F, h, w] -> [F, C, h, w]: the 2-D VAE decodes frames as a batch.
        per_frame = latents[0].permute(1, 0, 2, 3)
        chunks = []
        with torch.no_grad():
            for i in range(0, per_frame.shape[0], DECODE_CHUNK_FRAMES):
                image = vae.decode(per_frame[i : i + DECODE_CHUNK_FRAMES], return_dict=False)[0]
                chunks.append(((image.float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu())
        return torch.cat(chunks).contiguous()

    def decode_bytes_per_pixel(self, loaded: "LoadedPipeline") -> float:
        vae = loaded.pipe.vae
        channels = float((vae.config.get("block_out_channels") or [_FULL_FIRST_CHANNELS])[0])
        elem = torch.tensor([], dtype=vae.dtype).element_size()
        return _DECODE_BYTES_PER_PIXEL_FULL * (channels / _FULL_FIRST_CHANNELS) * (elem / 2.0) * DECODE_CHUNK_FRAMES


I2VGENXL_FAMILIES: tuple[type[Family], ...] = (I2VGenXL,)
