"""What the engine knows about each denoiser architecture, as data: one description per architecture, one file each.

The stream engine (which blocks to stream, which modules to hold only while they run), its lean forward (which
one applies, the fixed text length), token merging (the self-attention module of each block and its stock
processor, how the patch size reads) and the planner (the default run grid) all read the description of the model
in front of them; adding an architecture means adding a file here and registering it, like diffusers'
``hooks/_helpers.py`` registries of per-model metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DenoiserArchitecture:
    name: str
    # diffusers model classes (by name, so describing a model never imports it)
    model_classes: tuple[str, ...]
    block_class: str
    blocks: str  # the ModuleList attribute holding the repeated blocks
    self_attention: str  # attribute of a block
    cross_attention: str | None
    ffn: str
    norms: tuple[str, ...]
    # the stock self-attention processor class; token merging replaces only this one
    self_attention_processor: str
    # how ``config.patch_size`` reads: "thw" a (t, h, w) triple, "hw" one int for height and width (t = 1)
    patch_axes: str
    # fixed text length the attention processors split at (None: variable)
    text_tokens: int | None = None
    # image-encoder tokens put in front of the text in cross-attention (None: no image branch)
    image_tokens: int | None = None
    # non-block modules that run once per forward before the blocks: the stream engine copies them in only then
    transient_modules: tuple[str, ...] = ()
    # the stream engine's lean chunked forward for this architecture (offload.lean_forward.LEAN_FORWARDS), if any
    lean_forward: str | None = None
    # latent (frames, height, width) of the published default size: what the planner sizes a plan for at load time
    default_latent: tuple[int, int, int] = (21, 60, 104)

    def block_list(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        blocks = getattr(model, self.blocks, None)
        return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []

    def patch_thw(self, model: torch.nn.Module) -> tuple[int, int, int]:
        patch = model.config.patch_size
        if self.patch_axes == "thw":
            return tuple(int(p) for p in patch)
        return 1, int(patch), int(patch)

    def self_attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [getattr(b, self.self_attention) for b in self.block_list(model)]


ARCHITECTURES: dict[str, DenoiserArchitecture] = {}


def register_architecture(arch: DenoiserArchitecture) -> DenoiserArchitecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture_of(model: object) -> DenoiserArchitecture | None:
    """The description of ``model`` (matched on its class and base classes by name), None if unknown."""
    names = {c.__name__ for c in type(model).__mro__}
    for arch in ARCHITECTURES.values():
        if names.intersection(arch.model_classes):
            return arch
    return None


def linear_names(model: torch.nn.Module, prefix: str = "") -> dict[int, str]:
    """id of each Linear -> its qualified name (``prefix.blocks.0.attn1.to_q``), for weight patchers (LoRA) that
    must know which layer a weight belongs to without an attribute on the layer."""
    lead = f"{prefix}." if prefix else ""
    return {id(m): lead + q for q, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


from .easyanimate import EASYANIMATE  # noqa: E402  (registered after the dataclass exists)
from .wan import WAN  # noqa: E402

__all__ = ["DenoiserArchitecture", "ARCHITECTURES", "register_architecture", "architecture_of", "linear_names",
           "WAN", "EASYANIMATE"]
