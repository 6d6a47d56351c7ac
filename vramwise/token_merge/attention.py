"""Proportional attention over merged keys that come in a few size groups.

A key standing for ``c`` tokens must get ``c`` times the softmax weight of one token (proportional attention):
softmax(q k^T * scale + log c) v. Two exact ways to compute it:

* ``groups`` (default on CUDA): one plain attention per size group, each returning its log-sum-exp, then the
  group outputs averaged with weights c_g * exp(lse_g). No bias reaches a kernel, so every call runs on the
  kernel the stock processor gets (cuDNN or flash); with pair merging there are only 2-3 groups (``pairing``).
* ``bias`` (default elsewhere): all keys in one call with log(c) as an additive mask (CPU kernels take it at no
  extra cost; on CUDA it rules out the flash kernel).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

ATTENTION_IMPLS: tuple[str, ...] = ("groups", "bias")


def default_impl(device: torch.device) -> str:
    """``groups`` on CUDA (the stock kernel, no bias), ``bias`` elsewhere."""
    return "groups" if device.type == "cuda" else "bias"


# torch.nn.attention.SDPBackend values, as torch._fused_sdp_choice returns them
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3
_CUDNN_LSE_OK: dict[tuple, bool] = {}


def _sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> int:
    """The kernel ``F.scaled_dot_product_attention`` would run for these inputs (no mask).

    The merged calls must use the same kernel as the stock processor: on an H100 with torch 2.11 that is cuDNN,
    1.6x faster than the flash kernel at Wan's sizes (bench/RESULTS.md), so a fixed choice would lose the gain.
    """
    try:
        return int(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))
    except Exception:  # private API: if it moves, the flash kernel is the safe default
        return _FLASH


def _cudnn_lse_matches(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per device/dtype: cuDNN's log-sum-exp is the natural-log one over each query's row (shape and values)."""
    key = (str(device), dtype)
    if key not in _CUDNN_LSE_OK:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 128, generator=g).to(device, dtype) for n in (64, 96, 96))
        try:
            lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=0.1)[1]
            ref = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * 0.1, dim=-1)
            _CUDNN_LSE_OK[key] = lse.numel() == ref.numel() and bool(
                torch.allclose(lse.float().reshape(ref.shape), ref, atol=2e-2, rtol=1e-2)
            )
        except Exception:
            _CUDNN_LSE_OK[key] = False
    return _CUDNN_LSE_OK[key]


def _compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


# (device type, device index, dtype, head dim) -> the kernel the size groups run on (SDPBackend value)
_KERNELS: dict[tuple, int] = {}


def _kernel_key(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple:
    return device.type, device.index, dtype, head_dim


def _decide_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> int:
    choice = _sdpa_choice(q, k, v, scale)
    if choice == _CUDNN and not _cudnn_lse_matches(q.device, q.dtype):
        choice = _FLASH
    _KERNELS[_kernel_key(q.device, q.dtype, q.shape[-1])] = choice
    return choice


def prepare_kernels(device: torch.device, head_dim: int, heads: int = 8) -> None:
    """Decide the kernel per half-precision dtype now, in eager mode.

    Inside a compiled block (the stream engine compiles blocks with ``fullgraph=True``) neither the kernel choice
    nor the cuDNN check can be traced; the compiled code then only reads what this stored.
    """
    if device.type != "cuda" or _compiling():
        return
    for dtype in (torch.bfloat16, torch.float16):
        if _kernel_key(device, dtype, head_dim) not in _KERNELS:
            q = torch.zeros(1, heads, 1024, head_dim, device=device, dtype=dtype)
            _decide_kernel(q, q, q, head_dim**-0.5)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, layout [B, heads, S, D], and its log-sum-exp [B, heads, Sq] (float32, natural log).

    CUDA: the fused kernel SDPA itself would pick (cuDNN, flash or mem-efficient). Elsewhere: the math path in
    float32 or wider (the reference the tests compare against).
    """
    if q.is_cuda:
        d = q.shape[-1]
        if _compiling():
            choice = _KERNELS.get(_kernel_key(q.device, q.dtype, d), _FLASH)
        else:
            choice = _decide_kernel(q, k, v, scale)
        if choice == _CUDNN:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
            return res[0], res[1].reshape(q.shape[:3]).float()
        if choice != _EFFICIENT and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1]
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        return res[0], res[1][..., : q.shape[2]].float()
    work = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]) @ v.to(work)
    return out.to(q.dtype), lse


def combine_partial_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], log_weights: Sequence[float]
) -> torch.Tensor:
    """Exact softmax over the union of key groups, from each group's output and log-sum-exp.

    Group g (keys each standing for ``exp(log_weights[g])`` tokens) holds the mass ``exp(lse_g + log_weight_g)``;
    the result is the mass-weighted mean of the group outputs, folded in one group at a time with a running
    log-sum-exp: one ``lerp`` per extra group (reads two outputs, writes one; fp32 inside). The share is rounded to
    the output dtype, an error of the order of the output's own rounding.
    """
    acc = outs[0]
    acc_lse = lses[0] + log_weights[0]
    for out, lse, lw in zip(outs[1:], lses[1:], log_weights[1:]):
        mass = lse + lw
        total = torch.logaddexp(acc_lse, mass)
        share = torch.exp(mass - total)  # [B, heads, Sq]: this group's share of the softmax mass so far
        acc = torch.lerp(acc, out, share.unsqueeze(-1).to(acc.dtype))
        acc_lse = total
    return acc


def size_grouped_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    sizes: Sequence[int],
    impl: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + log size) v where ``keys[g]``/``values[g]`` [B, heads, M_g, D] stand for ``sizes[g]``
    tokens each; q [B, heads, Sq, D]. ``impl``: ``groups`` or ``bias`` (None: ``default_impl``)."""
    if not (len(keys) == len(values) == len(sizes)) or not keys:
        raise ValueError("need one key and one value tensor per size")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if len(keys) == 1:  # one size for every key: log(size) is a constant and cancels in the softmax
        return F.scaled_dot_product_attention(q, keys[0], values[0], scale=scale)
    impl = impl or default_impl(q.device)
    if impl == "groups":
        parts = [attention_with_lse(q, k, v, scale) for k, v in zip(keys, values)]
        # Largest group first: it carries most of the mass, so the running lerps move the output least.
        order = sorted(range(len(parts)), key=lambda i: -keys[i].shape[2] * sizes[i])
        return combine_partial_attention(
            [parts[i][0] for i in order], [parts[i][1] for i in order], [math.log(sizes[i]) for i in order]
        )
    if impl == "bias":
        bias = torch.cat([torch.full((k.shape[2],), math.log(s), device=q.device) for k, s in zip(keys, sizes)])
        return F.scaled_dot_product_attention(
            q, torch.cat(list(keys), dim=2), torch.cat(list(values), dim=2), attn_mask=bias.to(q.dtype).view(1, 1, 1, -1), scale=scale
        )
    raise ValueError(f"unknown attention impl {impl!r}; one of {ATTENTION_IMPLS}")
