"""Latents to frames, tiling the VAE when an untiled decode would not fit."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from .cancel_hooks import block_modules, cancel_hooks
from .device import free_bytes, is_oom, release_memory
from .errors import InputError, parse_choice
from .handles import VramwiseLatent, VramwiseModel
from .memory.host_run import check_request_fits_host, host_oom_error, is_host_oom

# Leave room for the allocator's fragmentation and for whatever else runs on the device.
FREE_MEMORY_SHARE = 0.85
# On out-of-memory the decode retries tiled, then with halved tiles down to this size.
MIN_TILE = 64


class TilingMode(str, Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def parse(cls, value: str) -> "TilingMode":
        return parse_choice(cls, value, "tiling", "tiling mode")


@dataclass(frozen=True)
class TilingOptions:
    mode: TilingMode = TilingMode.AUTO
    tile: int = 256
    overlap: int = 64

    def validate(self) -> None:
        if self.tile < 64:
            raise InputError("tile_size", f"{self.tile} px is too small.", "use 64 px or more (256 is a good default).")
        if not 0 <= self.overlap < self.tile:
            raise InputError(
                "tile_overlap",
                f"{self.overlap} px must be at least 0 and smaller than tile_size ({self.tile} px).",
                f"use about a quarter of the tile, e.g. {self.tile // 4}.",
            )


def estimate_untiled_bytes(model: VramwiseModel, latent: VramwiseLatent) -> int:
    return int(model.family.decode_bytes_per_pixel(model.loaded) * latent.width * latent.height)


def decode_latents(
    model: VramwiseModel,
    latent: VramwiseLatent,
    tiling: TilingOptions,
    check_cancel: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, str]:
    """Frames [F, H, W, 3] float32 0..1 on the CPU, and a note saying how they were decoded.

    ``check_cancel`` (ComfyUI's interrupt check) is called between decoder blocks; whatever it raises ends the
    decode with the VAE's hooks and memory given back.
    """
    tiling.validate()
    family = model.family
    if latent.family_id != family.id:
        raise InputError(
            "latent",
            f"it was sampled with a {latent.family_id} model but the connected model is {family.id}.",
            "connect the same model to the sampler and to the decoder.",
        )
    loaded = model.loaded
    if tiling.mode is TilingMode.AUTO:
        need = estimate_untiled_bytes(model, latent)
        have = free_bytes(loaded.device)
        use_tiles = need > have * FREE_MEMORY_SHARE
        why = f"untiled needs ~{need / 2**30:.2f} GiB, {have / 2**30:.2f} GiB free"
    else:
        use_tiles = tiling.mode is TilingMode.ON
        why = "as requested"
    tile, overlap = tiling.tile, tiling.overlap
    # The frames are float32 on the host whatever the device; on a CPU the VAE's work is there too.
    check_request_fits_host(loaded, latent.width, latent.height, latent.num_frames, False,
                            vae_tile=tile if use_tiles else None, decode_only=True)
    retries: list[str] = []
    while True:
        family.vae_tiling(loaded, use_tiles, tile, overlap)
        try:
            # The VAEs decode in loops of their own (Wan: one latent frame per decoder call; tiled: one tile per
            # call; I2VGen-XL: chunks of frames) with no callback, so Cancel is asked before each decoder block.
            decoder = getattr(loaded.pipe.vae, "decoder", None)
            blocks = block_modules(decoder) if isinstance(decoder, torch.nn.Module) else []
            if check_cancel is not None:
                check_cancel()
            with cancel_hooks(blocks, check_cancel):
                frames = family.decode(loaded, latent.samples)
            break
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if is_host_oom(e):
                raise host_oom_error(e, latent.width, latent.height, latent.num_frames) from e
            if not is_oom(e) or (use_tiles and tile <= MIN_TILE):
                raise
            was = f"tiled {tile}px" if use_tiles else "untiled"
            if use_tiles:
                tile = max(MIN_TILE, tile // 2)
                overlap = min(overlap, tile // 4)
            use_tiles = True
            retries.append(f"out of memory decoding {was}: retried tiled {tile}px/{overlap}px overlap")
        finally:
            loaded.placement.release()
            release_memory(loaded.device)
    how = f"tiled {tile}px/{overlap}px overlap" if use_tiles else "untiled"
    note = f"decoded {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, {how} ({why})"
    return frames, "; ".join([note] + retries)
