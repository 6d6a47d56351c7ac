"""Bipartite soft matching of keys/values on a frames x height x width token grid, and attention over the result.

Only keys and values are reduced; every query stays, so an attention call returns one output per input token
and nothing has to be unmerged afterwards. A merged token stands for ``size`` original tokens: adding
``log(size)`` to its attention logits (proportional attention) gives it the softmax share that its members had,
which makes merging exact duplicates lossless.

Layout of one plan:

* Tokens of the first ``protect_frames`` frames (the image-conditioning frame) are never merged.
* The rest of the grid is cut into windows (``frames x height x width`` tokens, padded at the far edges).
  Inside a window the tokens on a strided lattice are *destinations*, the others *sources*; each source
  finds its most similar destination of the same window (cosine similarity of the metric).
* The ``r`` sources with the highest similarity over the whole grid are averaged into their destinations;
  the other sources are kept as they are. ``r`` depends only on the grid and the ratio, so every call of a run
  has the same number of keys (static shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]  # frames, height, width (in tokens)
Window = tuple[int, int, int]

# Window shapes (frames, height, width) by name, and the destination lattices tried for each, densest first.
# A lattice (st, sh, sw) makes one token in st*sh*sw a destination, so it can merge at most 1 - 1/(st*sh*sw)
# of the window's tokens; the densest lattice that allows the requested ratio is used (more candidates each).
WINDOWS: dict[str, Window] = {"spatial": (1, 4, 4), "spatial+temporal": (2, 4, 4)}
LATTICES: dict[str, tuple[Window, ...]] = {
    "spatial": ((1, 2, 2), (1, 2, 4), (1, 4, 4)),
    "spatial+temporal": ((1, 2, 2), (2, 2, 2), (2, 2, 4), (2, 4, 4)),
}

AttentionImpl = Literal["mask", "cudnn", "fold", "flex", "groups"]
ATTENTION_IMPLS: tuple[str, ...] = ("mask", "cudnn", "fold", "flex", "groups")


def choose_lattice(window: str, ratio: float) -> Window:
    """The densest destination lattice of ``window`` whose source share is at least ``ratio``."""
    options = LATTICES[window]
    for lattice in options:
        if 1.0 - 1.0 / (lattice[0] * lattice[1] * lattice[2]) >= ratio - 1e-9:
            return lattice
    return options[-1]


@dataclass(frozen=True)
class WindowLayout:
    """Index tensors (CPU, int64) that split a grid into protected tokens, window destinations and sources."""

    num_tokens: int
    protected: torch.Tensor  # [P] token ids never merged
    src_tok: torch.Tensor  # [nWin, ns] token id of each source slot (0 where padding)
    src_valid: torch.Tensor  # [nWin, ns] bool
    dst_tok: torch.Tensor  # [nWin, nd] token id of each destination slot (0 where padding)
    dst_valid: torch.Tensor  # [nWin, nd] bool
    dst_slot: torch.Tensor  # [nWin * nd] position of a destination in ``dst_kept`` (-1 for padding)
    dst_kept: torch.Tensor  # [nDv] token ids of the real destinations, in slot order
    num_src: int  # real sources
    mergeable: int  # tokens inside windows (sources + destinations)

    def to(self, device: torch.device) -> "WindowLayout":
        return WindowLayout(
            self.num_tokens,
            *(t.to(device) for t in (self.protected, self.src_tok, self.src_valid, self.dst_tok, self.dst_valid,
                                     self.dst_slot, self.dst_kept)),
            self.num_src,
            self.mergeable,
        )


@lru_cache(maxsize=64)
def _layout_cpu(grid: Grid, window: Window, lattice: Window, protect_frames: int) -> WindowLayout | None:
    frames, height, width = grid
    f0 = min(protect_frames, frames)
    fm = frames - f0
    n = frames * height * width
    if fm <= 0:
        return None
    wt, wh, ww = min(window[0], fm), min(window[1], height), min(window[2], width)
    st, sh, sw = min(lattice[0], wt), min(lattice[1], wh), min(lattice[2], ww)
    nt, nh, nw = -(-fm // wt), -(-height // wh), -(-width // ww)
    t = torch.arange(nt * wt)
    h = torch.arange(nh * wh)
    w = torch.arange(nw * ww)
    valid = (t < fm)[:, None, None] & (h < height)[None, :, None] & (w < width)[None, None, :]
    tok = ((t[:, None, None] + f0) * height + h[None, :, None]) * width + w[None, None, :]
    tok = torch.where(valid, tok, torch.zeros_like(tok))

    def windows(x: torch.Tensor) -> torch.Tensor:
        # [nt*wt, nh*wh, nw*ww] -> [nWin, wt*wh*ww], window-local order (t, h, w)
        return x.view(nt, wt, nh, wh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, wt * wh * ww)

    tok_w, valid_w = windows(tok), windows(valid)
    lt = torch.arange(wt)[:, None, None]
    lh = torch.arange(wh)[None, :, None]
    lw = torch.arange(ww)[None, None, :]
    is_dst = ((lt % st == 0) & (lh % sh == 0) & (lw % sw == 0)).flatten()
    dst_local = is_dst.nonzero().flatten()
    src_local = (~is_dst).nonzero().flatten()
    dst_tok, dst_valid = tok_w[:, dst_local], valid_w[:, dst_local]
    src_tok, src_valid = tok_w[:, src_local], valid_w[:, src_local]
    keep = dst_valid.flatten().nonzero().flatten()
    dst_slot = torch.full((dst_valid.numel(),), -1, dtype=torch.int64)
    dst_slot[keep] = torch.arange(keep.numel())
    return WindowLayout(
        num_tokens=n,
        protected=torch.arange(f0 * height * width),
        src_tok=src_tok.contiguous(),
        src_valid=src_valid.contiguous(),
        dst_tok=dst_tok.contiguous(),
        dst_valid=dst_valid.contiguous(),
        dst_slot=dst_slot,
        dst_kept=dst_tok.flatten()[keep].contiguous(),
        num_src=int(src_valid.sum()),
        mergeable=int(valid.sum()),
    )


_DEVICE_LAYOUTS: dict[tuple, WindowLayout] = {}


def window_layout(grid: Grid, window: str, ratio: float, protect_frames: int, device: torch.device) -> WindowLayout | None:
    """The (cached) layout of ``grid`` for a window name and ratio, on ``device``; None if nothing can merge."""
    lattice = choose_lattice(window, ratio)
    key = (tuple(grid), window, lattice, protect_frames, str(device))
    layout = _DEVICE_LAYOUTS.get(key)
    if layout is None:
        cpu = _layout_cpu(tuple(grid), WINDOWS[window], lattice, protect_frames)
        if cpu is None or cpu.num_src == 0:
            return None
        layout = cpu.to(device)
        if len(_DEVICE_LAYOUTS) > 64:
            _DEVICE_LAYOUTS.clear()
        _DEVICE_LAYOUTS[key] = layout
    return layout


def merge_count(layout: WindowLayout, ratio: float) -> int:
    """Sources to merge: ``ratio`` of the tokens inside windows, at most every source."""
    return max(0, min(layout.num_src, int(round(ratio * layout.mergeable))))


@dataclass
class MergePlan:
    """Which token goes where for one attention call; ``reduce`` applies it to keys or values."""

    layout: WindowLayout
    merged_tok: torch.Tensor  # [B, r] token ids averaged into a destination
    target_slot: torch.Tensor  # [B, r] their destination's slot in layout.dst_kept
    kept_tok: torch.Tensor  # [B, K] sources kept as they are
    sizes: torch.Tensor  # [B, nDv] float32, tokens each destination now stands for

    @property
    def num_keys(self) -> int:
        return self.layout.protected.numel() + self.layout.dst_kept.numel() + self.kept_tok.shape[1]

    @property
    def log_size(self) -> torch.Tensor:
        """[B, M] float32: log(tokens represented) per reduced token, in ``reduce``'s order."""
        b = self.sizes.shape[0]
        zeros_p = self.sizes.new_zeros(b, self.layout.protected.numel())
        zeros_k = self.sizes.new_zeros(b, self.kept_tok.shape[1])
        return torch.cat([zeros_p, self.sizes.log(), zeros_k], dim=1)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, M, C]: protected tokens, size-weighted destination means, kept sources."""
        b, _, c = x.shape
        rows = torch.arange(b, device=x.device)[:, None]
        protected = x[:, self.layout.protected]
        dst = x[:, self.layout.dst_kept].float()
        r = self.merged_tok.shape[1]
        if r:
            n_dst = dst.shape[1]
            flat = (self.target_slot + rows * n_dst).flatten()
            dst.view(b * n_dst, c).index_add_(0, flat, x[rows, self.merged_tok].float().view(b * r, c))
            dst = dst / self.sizes[..., None]
        kept = x[rows, self.kept_tok]
        return torch.cat([protected, dst.to(x.dtype), kept], dim=1)


def plan_merge(
    metric: torch.Tensor,
    grid: Grid,
    ratio: float,
    window: str = "spatial",
    protect_frames: int = 1,
) -> MergePlan | None:
    """Match tokens by ``metric`` [B, N, D] (e.g. keys averaged over heads); None if nothing would merge."""
    b, n, _ = metric.shape
    if n != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"metric has {n} tokens but the grid {grid} has {grid[0] * grid[1] * grid[2]}")
    layout = window_layout(grid, window, ratio, protect_frames, metric.device)
    if layout is None:
        return None
    r = merge_count(layout, ratio)
    if r == 0:
        return None
    with torch.no_grad():
        m = F.normalize(metric.float(), dim=-1)
        n_win, ns = layout.src_tok.shape
        nd = layout.dst_tok.shape[1]
        sim = m[:, layout.src_tok] @ m[:, layout.dst_tok].transpose(-1, -2)  # [B, nWin, ns, nd]
        sim = sim.masked_fill(~layout.dst_valid[None, :, None, :], float("-inf"))
        best, choice = sim.max(dim=-1)  # [B, nWin, ns]
        best = best.masked_fill(~layout.src_valid[None], float("-inf")).flatten(1)
        choice = choice.flatten(1)
        # Padding sources score -inf and sort last, so the first num_src entries are all real sources.
        order = best.argsort(dim=1, descending=True, stable=True)
        merged = order[:, :r]
        kept = order[:, r : layout.num_src]
        src_flat = layout.src_tok.flatten()
        window_of = torch.div(merged, ns, rounding_mode="floor")
        target = layout.dst_slot[window_of * nd + choice.gather(1, merged)]
        sizes = torch.ones(b, layout.dst_kept.numel(), device=metric.device, dtype=torch.float32)
        sizes.scatter_add_(1, target, torch.ones_like(target, dtype=torch.float32))
    return MergePlan(layout=layout, merged_tok=src_flat[merged], target_slot=target, kept_tok=src_flat[kept], sizes=sizes)


# ----------------------------------------------------------------------------- attention with size bias


def _fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor, scale: float):
    """Carry log(size) in one extra head channel: q gets 1, k gets log(size)/scale, v gets 0.

    The head dim is padded to a multiple of 8 so the fused kernels still take it.
    """
    d = q.shape[-1]
    extra = 8 - d % 8 if d % 8 else 8
    b, h, m = k.shape[0], k.shape[1], k.shape[2]
    q_pad = q.new_zeros(*q.shape[:-1], extra)
    q_pad[..., 0] = 1.0
    k_pad = k.new_zeros(b, h, m, extra)
    k_pad[..., 0] = (log_size / scale).to(k.dtype)[:, None, :]
    return (torch.cat([q, q_pad], -1), torch.cat([k, k_pad], -1), torch.cat([v, v.new_zeros(b, h, m, extra)], -1))


def _prefer_cudnn():
    """SDPA kernels in the order cuDNN, mem-efficient, math (the flash kernel takes no bias)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order, the allowed set alone
        return sdpa_kernel(order)


_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, layout [B, heads, S, D], and its log-sum-exp [B, heads, Sq] (float32, natural log).

    CUDA: the flash kernel (bf16/fp16, head dim a multiple of 8 up to 256), else the mem-efficient one.
    Elsewhere: the math path in float32 or wider (the reference the tests compare against).
    """
    d = q.shape[-1]
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
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
    outs: list[torch.Tensor], lses: list[torch.Tensor], log_weights: list[float]
) -> torch.Tensor:
    """Exact softmax over the union of key groups, from each group's output and log-sum-exp.

    Group g (keys each standing for ``exp(log_weights[g])`` tokens) holds the mass ``exp(lse_g + log_weight_g)``;
    the result is the mass-weighted mean of the group outputs. Folded in one group at a time with a running
    log-sum-exp, each step one ``lerp`` (one pass over two outputs, fp32 inside). The same code runs on every
    backend; only ``attention_with_lse`` differs.
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


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor, scale: float):
    """softmax(q k^T * scale + log_size) v for integer sizes, without a bias: one plain attention per distinct size.

    Keys are sorted by the number of tokens ``c`` they stand for; each group runs on the fastest bias-free kernel
    (flash on CUDA) and returns its log-sum-exp, and ``combine_partial_attention`` weights group g by ``c_g``.
    Exact up to float rounding. Needs one device-to-host copy of the sizes per call (group boundaries); sizes
    that are not whole numbers fall back to the additive-bias path.
    """
    outs_b = []
    for b in range(q.shape[0]):
        ls = log_size[b].detach().float().cpu()
        counts = ls.exp().round()
        if not bool(((counts.clamp_min(1).log() - ls).abs() < 1e-4).all()):
            bias = log_size.to(q.dtype)[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        counts = counts.long()
        qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
        values, group_sizes = torch.unique(counts, sorted=True, return_counts=True)
        if values.numel() == 1:  # one size for all keys: the bias is a constant and cancels
            outs_b.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale))
            continue
        order = torch.argsort(counts, stable=True).to(k.device, non_blocking=True)
        ks, vs = kb.index_select(2, order), vb.index_select(2, order)
        outs, lses, log_w, start = [], [], [], 0
        for c, n in zip(values.tolist(), group_sizes.tolist()):
            o, lse = attention_with_lse(qb, ks.narrow(2, start, n), vs.narrow(2, start, n), scale)
            outs.append(o)
            lses.append(lse)
            log_w.append(math.log(c))
            start += n
        # Largest group first: it carries most of the mass, so the running lerps move the output least.
        idx = sorted(range(len(outs)), key=lambda i: -group_sizes[i].item())
        outs_b.append(
            combine_partial_attention([outs[i] for i in idx], [lses[i] for i in idx], [log_w[i] for i in idx])
        )
    return outs_b[0] if len(outs_b) == 1 else torch.cat(outs_b, dim=0)


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_size: torch.Tensor | None,
    impl: str = "mask",
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + log_size) v, layout [B, heads, S, D]; ``log_size`` [B, M] float32 or None.

    impl: ``mask`` an additive bias to PyTorch SDPA (the reference; on CUDA it excludes the flash kernel),
    ``cudnn`` the same bias with the cuDNN kernel preferred, ``fold`` the bias carried in an extra head channel
    (any kernel, head dim padded by 8), ``flex`` FlexAttention with a score modifier (compiled; CUDA),
    ``groups`` one bias-free attention per distinct size combined through the log-sum-exps (flash kernel on CUDA;
    sizes must be whole numbers, as merge plans' are).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if log_size is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if impl == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=log_size.to(q.dtype)[:, None, None, :], scale=scale)
    if impl == "cudnn":
        with _prefer_cudnn():
            bias = log_size.to(q.dtype)[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if impl == "fold":
        d = q.shape[-1]
        qf, kf, vf = _fold(q, k, v, log_size, scale)
        return F.scaled_dot_product_attention(qf, kf, vf, scale=scale)[..., :d]
    if impl == "flex":
        bias = log_size.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        return _flex_attention()(q, k, v, score_mod=score_mod, scale=scale)
    if impl == "groups":
        return grouped_attention(q, k, v, log_size, scale)
    raise ValueError(f"unknown attention impl {impl!r}; one of {ATTENTION_IMPLS}")


def default_impl(device: torch.device) -> str:
    """The proportional-attention implementation used when none is forced.

    CUDA: ``cudnn``, the fastest of the four on an H200 with torch 2.11 at every ratio measured (Wan 14B,
    480x832x81, ratio 0.5: cudnn 2.92 s, mask 2.92, fold 2.99, flex 3.07, stock unmerged 3.13; bench/RESULTS.md
    "Token merge"). ``groups`` keeps the flash kernel but was slower still (ratio 0.5: 3.46 s vs cudnn 2.94; round 2
    there). Elsewhere ``mask`` (the CPU kernels take an additive bias at no extra cost).
    """
    return "cudnn" if device.type == "cuda" else "mask"
