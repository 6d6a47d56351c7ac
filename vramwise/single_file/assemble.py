"""A WanImageToVideoPipeline assembled from single files; ``SingleFileSpec`` is the loader's ``source``.

``vramwise.loader.load_pipeline`` asks a source for its family (for rules, sampling and decoding) and for the
pipeline built on the CPU; precision (fp8 storage) and offload placement then run unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .detect import ArchInfo, detect_transformer
from .reader import read_header

BOUNDARY_RATIO_A14B = 0.9
_DEFAULT_SHIFT = {"wan2.1-i2v": 3.0, "wan2.1-flf2v": 5.0, "wan2.2-i2v-a14b": 5.0, "wan2.2-ti2v-5b": 5.0}


def _stamp(path: Path | None) -> tuple:
    if path is None:
        return ()
    try:
        st = os.stat(path)
        return (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


@dataclass(frozen=True)
class SingleFileSpec:
    """The files of one Wan model; equal specs (same files, unchanged on disk) share a cached pipeline."""

    diffusion_model: Path
    text_encoder: Path
    vae: Path
    diffusion_model_2: Path | None = None
    clip_vision: Path | None = None
    stamp: tuple = field(default=(), compare=True)

    @classmethod
    def create(cls, **paths: Any) -> "SingleFileSpec":
        clean = {k: (Path(v) if v is not None else None) for k, v in paths.items()}
        stamp = tuple(_stamp(clean.get(k)) for k in ("diffusion_model", "diffusion_model_2", "text_encoder", "clip_vision", "vae"))
        return cls(stamp=stamp, **clean)

    @property
    def name(self) -> str:
        return self.diffusion_model.name

    def check(self) -> tuple[ArchInfo, ArchInfo | None]:
        """Detect the architecture and check that the files belong together (headers only)."""
        info = detect_transformer(self.diffusion_model)
        info2 = None
        if info.arch == "wan2.2-i2v-a14b-expert":
            if self.diffusion_model_2 is None:
                raise InputError(
                    "diffusion_model_2",
                    f"'{self.diffusion_model.name}' is one Wan2.2 I2V-A14B expert; the model needs both.",
                    "pick the high-noise expert in 'diffusion_model' and the low-noise expert in 'diffusion_model_2'.",
                )
            info2 = detect_transformer(self.diffusion_model_2)
            if info2.arch != info.arch or info2.config != info.config:
                raise InputError(
                    "diffusion_model_2",
                    f"'{self.diffusion_model_2.name}' ({info2.label}) does not pair with '{self.diffusion_model.name}' ({info.label}).",
                    "pick the other Wan2.2 I2V-A14B expert (low noise) of the same release.",
                )
        elif self.diffusion_model_2 is not None:
            raise InputError(
                "diffusion_model_2",
                f"'{self.diffusion_model.name}' is {info.label}, which has one diffusion model.",
                "set 'diffusion_model_2' to none (it is only for the Wan2.2 I2V-A14B low-noise expert).",
            )
        if info.needs_clip and self.clip_vision is None:
            raise InputError(
                "clip_vision",
                f"{info.label} needs a CLIP vision model for the start image.",
                "pick clip_vision_h.safetensors in 'clip_vision' (models/clip_vision).",
            )
        if not info.needs_clip and self.clip_vision is not None:
            raise InputError(
                "clip_vision",
                f"{info.label} has no CLIP image branch, so '{self.clip_vision.name}' would be ignored.",
                "set 'clip_vision' to none (only Wan2.1 I2V/FLF2V use it).",
            )
        from .text_encoder import check_text_dim

        check_text_dim(read_header(self.text_encoder), info.text_dim)
        return info, info2

    def family(self):
        from ..families import family_by_id

        info, info2 = self.check()
        family = family_by_id(info.family_id)
        if info.is_gguf or (info2 is not None and info2.is_gguf):
            # Seen on CPU with diffusers 0.42.1: accelerate's sequential offload fails with a TypeError when it
            # rebuilds a GGUF-quantized parameter on another device. model and group offload work.
            family.unsupported_offload_modes = {
                **family.unsupported_offload_modes,
                "sequential": "its GGUF-quantized weights cannot be moved layer by layer by accelerate's sequential offload",
            }
        return family

    def weight_source(self, component: str, dtype: torch.dtype):
        """Where ``encoder_weights`` re-reads a released component: the text encoder's file, or None."""
        if component != "text_encoder" or self.text_encoder.suffix.lower() != ".safetensors":
            return None
        from .text_encoder import text_encoder_source

        return text_encoder_source(self.text_encoder, dtype)

    def load(self, torch_dtype: torch.dtype, keep_fp8: bool = False) -> Any:
        """Build the pipeline on the CPU. ``keep_fp8``: plain fp8 weights stay fp8 (fp8 storage follows)."""
        from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

        from .clip_vision import load_clip_vision
        from .text_encoder import load_text_encoder, load_tokenizer
        from .transformer import load_transformer
        from .vae import load_vae

        info, info2 = self.check()
        if keep_fp8 and (info.is_gguf or (info2 is not None and info2.is_gguf)):
            raise InputError(
                "weight_dtype",
                f"'{self.diffusion_model.name}' is a GGUF file: its weights are already quantized, and fp8 storage "
                "on top would cast the quantized blocks as if they were plain weights.",
                "pick bf16 (or fp16) in 'weight_dtype'; the GGUF weights stay quantized and compute in that precision.",
            )
        tokenizer = load_tokenizer(self.text_encoder)
        transformer = load_transformer(self.diffusion_model, info, torch_dtype, keep_fp8)
        transformer_2 = load_transformer(self.diffusion_model_2, info2, torch_dtype, keep_fp8) if info2 else None
        text_encoder = load_text_encoder(self.text_encoder, torch_dtype, keep_fp8)
        image_encoder = processor = None
        if info.needs_clip:
            image_encoder, processor = load_clip_vision(self.clip_vision, torch_dtype, info.config.get("image_dim"))
        vae = load_vae(self.vae, torch_dtype, z_dim=int(info.config["out_channels"]))
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
            flow_shift=_DEFAULT_SHIFT.get(info.family_id, 5.0),
        )
        return WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            image_processor=processor,
            image_encoder=image_encoder,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=BOUNDARY_RATIO_A14B if transformer_2 is not None else None,
            expand_timesteps=info.family_id == "wan2.2-ti2v-5b",
        )
