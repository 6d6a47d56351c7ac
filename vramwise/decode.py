"""Latents to frames, tiling the VAE when an untiled decode would not fit."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

import torch

from .device import free_bytes, is_oom, release_memory
from .errors import InputError
from .handles import VramwiseLatent, VramwiseModel

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
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError("tiling", f"'{value}' is not a known tiling mode.", f"pick one of {choices}.") from None


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


def _blocks_of(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder and every module held in one of its ModuleLists (up blocks, their resnets and upsamplers)."""
    out = [decoder]
    for module in decoder.modules():
        if isinstance(module, torch.nn.ModuleList):
            out.extend(module)
    return out


@contextmanager
def cancel_checks(vae: torch.nn.Module, check_cancel: Callable[[], None] | None) -> Iterator[None]:
    """Call ``check_cancel`` before the VAE decoder and each of its blocks runs, so Cancel lands within one block.

    The VAEs decode in loops of their own (Wan: one latent frame per decoder call; tiled decodes: one tile per
    call; I2VGen-XL: chunks of frames), none with a callback, so forward pre-hooks are the one place to ask; they
    are removed when the decode ends, however it ends.
    """
    decoder = getattr(vae, "decoder", None)
    if check_cancel is None or not isinstance(decoder, torch.nn.Module):
        yield
        return

    def pre_hook(module: torch.nn.Module, args) -> None:
        check_cancel()

    handles = [m.register_forward_pre_hook(pre_hook) for m in _blocks_of(decoder)]
    try:
        check_cancel()
        yield
    finally:
        for h in handles:
            h.remove()


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
    retries: list[str] = []
    while True:
        family.vae_tiling(loaded, use_tiles, tile, overlap)
        try:
            with cancel_checks(loaded.pipe.vae, check_cancel):
                frames = family.decode(loaded, latent.samples)
            break
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(e) or (use_tiles and tile <= MIN_TILE):
                raise
            was = f"tiled {tile}px" if use_tiles else "untiled"
            if use_tiles:
                tile = max(MIN_TILE, tile // 2)
                overlap = min(overlap, tile // 4)
            use_tiles = True
            retries.append(f"out of memory decoding {was}: retried tiled {tile}px/{overlap}px overlap")
        finally:
            loaded.release_hooks()
            release_memory(loaded.device)
    how = f"tiled {tile}px/{overlap}px overlap" if use_tiles else "untiled"
    note = f"decoded {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, {how} ({why})"
    return frames, "; ".join([note] + retries)
