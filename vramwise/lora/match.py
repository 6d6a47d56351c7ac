"""Match a converted LoRA against one denoiser: which Linear layers it targets, what does not fit, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .convert import LoraFile, LoraLayer


@dataclass
class LoraMatch:
    """The layers of ``lora`` that fit ``denoiser`` (by diffusers module name) and the counts of those that don't."""

    lora: LoraFile
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    wrong_shape: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # no such Linear in the denoiser

    @property
    def matched_keys(self) -> int:
        return sum(_tensors(l) for l in self.layers.values())

    @property
    def total_keys(self) -> int:
        return self.lora.source_keys

    @property
    def ignored_keys(self) -> int:
        """File tensors that change nothing here: not applied by the conversion, no such layer, wrong shape."""
        return self.total_keys - self.matched_keys


def _tensors(layer: LoraLayer) -> int:
    return sum(t is not None for t in (layer.down, layer.up, layer.bias))


def _fits(module: torch.nn.Linear, layer: LoraLayer) -> bool:
    # in/out_features rather than weight.shape: GGUF weights are stored in their quantized shape.
    out_f, in_f = module.out_features, module.in_features
    if (layer.down is None) != (layer.up is None):
        return False
    if layer.down is not None:
        if layer.down.dim() != 2 or layer.up.dim() != 2 or layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
            return False
        if layer.up.shape[1] != layer.down.shape[0]:
            return False
    if layer.bias is not None and (module.bias is None or tuple(layer.bias.shape) != (out_f,)):
        return False
    return True


def match_lora(denoiser: torch.nn.Module, lora: LoraFile) -> LoraMatch:
    """Sort the LoRA's layers into those that fit ``denoiser``'s Linear layers, wrong shapes and unknown names.

    A Wan2.1 T2V LoRA on an I2V model simply leaves the image projections (``add_k_proj``/``add_v_proj``) alone,
    which is what diffusers' zero padding (``_maybe_expand_t2v_lora_for_i2v``) amounts to.
    """
    modules = dict(denoiser.named_modules())
    result = LoraMatch(lora)
    for name, layer in lora.layers.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            result.unmatched.append(name)
        elif not _fits(module, layer):
            result.wrong_shape.append(name)
        else:
            result.layers[name] = layer
    return result
