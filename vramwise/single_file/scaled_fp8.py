"""ComfyUI's "fp8_scaled" files: fp8 weights with a per-tensor ``<layer>.scale_weight``.

The true weight is ``weight.float() * scale_weight``. diffusers' single-file loader drops the scales (a warning
only), which gives wrong weights without an error; here every scale is folded into its weight while loading.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = ".scale_weight"
# Bookkeeping entries of scaled files: a marker tensor and input scales (unused when weights are upcast).
_EXTRA = ("scaled_fp8", ".scale_input")


def is_scale_key(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX) or name == "scaled_fp8" or name.endswith(".scaled_fp8") or name.endswith(".scale_input")


def fold_scale(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` computed in fp32, returned in ``dtype`` (scale: a scalar or per-output-row tensor)."""
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if s.numel() > 1 and s.dim() == 1 and w.dim() >= 1 and s.shape[0] == w.shape[0]:
        s = s.view(-1, *([1] * (w.dim() - 1)))
    return (w * s).to(dtype)


def scale_weights(state: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """Inverse (for tests and tools): 2-D+ float weights -> fp8 with a per-tensor scale, as ComfyUI writes them."""
    out: dict[str, torch.Tensor] = {}
    fmax = torch.finfo(fp8).max
    for name, t in state.items():
        if name.endswith(".weight") and t.dim() >= 2 and t.is_floating_point():
            amax = t.detach().float().abs().max().clamp(min=1e-12)
            scale = (amax / fmax).reshape(())
            out[name] = (t.float() / scale).to(fp8)
            out[name[: -len(".weight")] + SCALE_SUFFIX] = scale.float()
        else:
            out[name] = t
    out["scaled_fp8"] = torch.zeros(0, dtype=fp8)
    return out
