"""What every model family provides: recognition, defaults, input rules, loading, sampling and decoding.

A family turns a generic request into calls of one diffusers pipeline. The nodes never branch on the family:
they ask it for rules (sizes, frames) and hand it the request.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image

if TYPE_CHECKING:
    from ..handles import LoadedPipeline, RunInfo


@dataclass(frozen=True)
class FamilyDefaults:
    """The settings the model was trained and published with; shown in tooltips and used by the demo."""

    width: int
    height: int
    num_frames: int
    steps: int
    cfg: float
    shift: float
    fps: float

    def describe(self) -> str:
        return (
            f"{self.width}x{self.height}, {self.num_frames} frames @ {self.fps:g} fps, "
            f"{self.steps} steps, cfg {self.cfg:g}, shift {self.shift:g}"
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A validated sampling request: images already fitted to width x height."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    cfg: float
    seed: int
    shift: float
    end_image: Image.Image | None = None
    scheduler: str = "default"  # families.schedulers.SCHEDULERS; "default" = the pipeline's own
    cfg_low_noise: float | None = None  # Wan2.2 A14B: guidance of the low-noise expert (None: same as cfg)
    boundary: float | None = None  # Wan2.2 A14B: switch to the low-noise expert below this share of timesteps

    @property
    def do_cfg(self) -> bool:
        return self.cfg > 1.0


@dataclass(frozen=True)
class ModelIndex:
    """A diffusers folder's model_index.json and lazy access to its components' config.json files."""

    folder: Path
    index: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> "ModelIndex":
        with open(folder / "model_index.json", encoding="utf-8") as f:
            return cls(folder, json.load(f))

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def has_component(self, name: str) -> bool:
        entry = self.index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None

    def component_class(self, name: str) -> str | None:
        return self.index[name][1] if self.has_component(name) else None

    def component_config(self, name: str) -> dict[str, Any]:
        path = self.folder / name / "config.json"
        if not path.is_file():
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def components(self) -> list[str]:
        return sorted(k for k in self.index if not k.startswith("_") and self.has_component(k))


StepCallback = Callable[[int, int, torch.Tensor], None]


class Family(ABC):
    """One supported architecture. Subclasses are stateless singletons registered in ``families.FAMILIES``."""

    id: str
    label: str
    pipeline_class_name: str
    defaults: FamilyDefaults
    size_multiple: int = 16
    # Frames must be temporal_factor * k + 1 (the VAE compresses time by this factor, keeping the first frame).
    temporal_factor: int = 4
    max_frames: int = 1025
    supports_end_image: bool = False
    denoiser_names: tuple[str, ...] = ("transformer",)
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # ``load`` takes ``fp8_skip`` and reads the layers fp8 storage casts straight into fp8 (weight_loading.py).
    loads_fp8_directly: bool = False
    # ``load`` takes ``unread_text_encoder``: the text encoder is built without reading its weights, which are read
    # when a prompt is first encoded (encoder_weights.unread_encoder).
    text_encoder_unread_at_load: bool = False
    # Layers (regex on module names) kept in compute precision under fp8 storage, on top of precision.DENOISER_FP8_SKIP.
    fp8_skip_patterns: tuple[str, ...] = ()
    # Offload modes this family cannot use, with the reason the loader shows (e.g. no repeated blocks to stream).
    unsupported_offload_modes: dict[str, str] = {}
    # Name of the latent format in ComfyUI's comfy.latent_formats, used for cheap RGB previews.
    preview_latent_format: str | None = None
    # True when diffusers has a context-parallel plan (``_cp_plan``) for the denoiser, so ``gpus`` > 1 can split
    # its video tokens across GPUs (vramwise/parallel); families without one refuse gpus > 1.
    supports_context_parallel: bool = False

    @classmethod
    @abstractmethod
    def matches(cls, index: ModelIndex) -> bool:
        """True if the folder holds this family's pipeline."""

    @abstractmethod
    def load(self, folder: Path, torch_dtype: torch.dtype) -> Any:
        """Build the diffusers pipeline on the CPU (placement is the offload planner's job)."""

    @abstractmethod
    def latent_factors(self, pipe: Any) -> tuple[int, int]:
        """(spatial, temporal) compression of the family's VAE."""

    def run_info(self, loaded: "LoadedPipeline", request: GenerationRequest) -> "RunInfo":
        """Latent grid of a request, for patches and memory planning."""
        from ..handles import RunInfo

        s, t = self.latent_factors(loaded.pipe)
        return RunInfo(
            width=request.width,
            height=request.height,
            num_frames=request.num_frames,
            steps=request.steps,
            # The VAEs keep the first frame and compress the rest t:1.
            latent_frames=(request.num_frames - 1) // t + 1,
            latent_height=request.height // s,
            latent_width=request.width // s,
            do_cfg=request.cfg > 1.0,
        )

    def configure_scheduler(self, pipe: Any, request: GenerationRequest) -> None:
        """Apply per-run scheduler settings (flow shift) before sampling starts."""
        if request.scheduler != "default":
            from ..errors import InputError

            raise InputError("scheduler", f"'{request.scheduler}' is for flow-matching models (Wan); "
                             f"{self.label} uses its own scheduler.", "pick scheduler 'default'.")

    @abstractmethod
    def sample(self, loaded: "LoadedPipeline", request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        """Denoise and return the pipeline's latents (normalised, batch of one) on any device."""

    @abstractmethod
    def decode(self, loaded: "LoadedPipeline", latents: torch.Tensor) -> torch.Tensor:
        """Turn latents into frames [F, H, W, 3] float32 in 0..1 on the CPU."""

    def vae_tiling(self, loaded: "LoadedPipeline", enabled: bool, tile: int, overlap: int) -> None:
        """Switch the VAE's tiled decode on or off with tiles of ``tile`` pixels overlapping by ``overlap``."""
        vae = loaded.pipe.vae
        if enabled:
            vae.enable_tiling(
                tile_sample_min_height=tile,
                tile_sample_min_width=tile,
                tile_sample_stride_height=tile - overlap,
                tile_sample_stride_width=tile - overlap,
            )
        else:
            vae.disable_tiling()

    def decode_bytes_per_pixel(self, loaded: "LoadedPipeline") -> float:
        """Peak bytes an untiled decode needs per output pixel of one frame (estimate for ``tiling=auto``)."""
        return 12_400.0

    def valid_frames_near(self, n: int) -> tuple[int, int]:
        """The valid frame counts just below and above ``n``."""
        f = self.temporal_factor
        below = max(1, ((n - 1) // f) * f + 1)
        above = below if below == n else below + f
        return below, above

    def frames_valid(self, n: int) -> bool:
        return n >= 1 and (n - 1) % self.temporal_factor == 0
