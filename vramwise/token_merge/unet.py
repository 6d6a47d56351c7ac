"""Token merging for I2VGen-XL's 3-D UNet with tomesd, on the spatial transformer blocks only.

``tomesd.apply_patch`` cannot be used as is on I2VGen-XL: it takes (H, W) from the model input's dims 2 and 3,
which for the 5-D video latent [B, C, frames, H, W] are (frames, H), and it patches every
``BasicTransformerBlock``, including the temporal ones whose tokens are frames. Here tomesd's own block class
(``tomesd.patch.make_diffusers_tome_block``) is given only to the blocks inside ``Transformer2DModel``
(per-frame spatial attention, tokens = H x W), with the patch info set by us and (H, W) read from the latent's
last two dims. Temporal blocks, ``transformer_in`` and the image-latent encoder are left alone.

Activity is switched per step by switching each block's class between tomesd's and the original, so inactive
steps and a detached model run the unmodified diffusers code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_TOME_CLASSES: dict[type, type] = {}


@dataclass(frozen=True)
class UnetMergeSettings:
    ratio: float
    # tomesd's knobs, at its recommended defaults: merge only in blocks at full latent resolution, one
    # destination per 2x2 tokens, random destinations (seeded from the global RNG, which sampling seeds).
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True


def is_unet(denoiser: torch.nn.Module) -> bool:
    return any(c.__name__ == "I2VGenXLUNet" for c in type(denoiser).__mro__)


def spatial_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """``BasicTransformerBlock``s of the per-frame spatial transformers (``Transformer2DModel``), in order."""
    blocks = []
    for module in unet.modules():
        if type(module).__name__ == "Transformer2DModel":
            blocks.extend(module.transformer_blocks)
    return blocks


def _tome_class(cls: type) -> type:
    from tomesd.patch import make_diffusers_tome_block

    made = _TOME_CLASSES.get(cls)
    if made is None:
        made = make_diffusers_tome_block(cls)
        _TOME_CLASSES[cls] = made
    return made


@dataclass
class UnetPatchHandle:
    info: dict[str, Any]
    blocks: list[tuple[torch.nn.Module, type, type]] = field(default_factory=list)
    hook: Any = None
    skipped: int = 0  # blocks whose forward is wrapped per instance (a class swap would not reach them)
    active: bool = True

    def set_active(self, active: bool) -> None:
        self.active = active
        for block, original, tome in self.blocks:
            block.__class__ = tome if active else original

    def detach(self) -> None:
        for block, original, _ in self.blocks:
            block.__class__ = original
            block.__dict__.pop("_tome_info", None)
        self.blocks.clear()
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.info["hooks"].clear()


def patch_unet(unet: torch.nn.Module, settings: UnetMergeSettings) -> UnetPatchHandle:
    """Give tomesd's merging block to the UNet's spatial transformer blocks."""
    info: dict[str, Any] = {
        "size": None,
        "hooks": [],
        "args": {
            "ratio": float(settings.ratio),
            "max_downsample": settings.max_downsample,
            "sx": settings.sx,
            "sy": settings.sy,
            "use_rand": settings.use_rand,
            "generator": None,
            "merge_attn": True,
            "merge_crossattn": False,
            "merge_mlp": False,
        },
    }
    handle = UnetPatchHandle(info)
    if settings.ratio <= 0:
        return handle
    for block in spatial_blocks(unet):
        if "forward" in block.__dict__:
            handle.skipped += 1
            continue
        original = type(block)
        block._tome_info = info
        tome = _tome_class(original)
        block.__class__ = tome
        handle.blocks.append((block, original, tome))

    def size_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        # [B, C, frames, H, W]: the spatial blocks see H x W tokens per frame at full resolution.
        info["size"] = (int(sample.shape[-2]), int(sample.shape[-1]))

    if handle.blocks:
        handle.hook = unet.register_forward_pre_hook(size_hook, with_kwargs=True)
        info["hooks"].append(handle.hook)
    return handle
