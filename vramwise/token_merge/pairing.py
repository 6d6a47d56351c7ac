"""Which keys/values to merge: capacity-one bipartite matching inside windows, in rounds of pairs.

Why pairs: proportional attention weights a merged key by the number of tokens it stands for. When those
numbers vary freely (1, 2, ... 11 in classic bipartite soft matching), the weight has to reach the attention
kernel as an additive bias, and PyTorch's fastest kernel (flash) takes none; the biased kernels ate most of the
speed-up on an H200 (bench/RESULTS.md, "Token merge"). Here every destination takes *at most one* source per
round, so after round j each merged key stands for exactly 2**j tokens. A plan then holds two or three sizes
whose key counts depend only on the grid and the ratio (no device sync): one bias-free attention per size and an
exact log-sum-exp combine (``attention``) reproduce the size-weighted softmax.

Layout of a plan:

* Tokens of the first ``protect_frames`` frames (the image-conditioning frame) are never merged.
* The other tokens are ordered window by window (window shape below, local order frames, rows, columns) and cut
  into runs of 16; a run is a window, or two half windows side by side where the grid does not divide. The few
  tokens after the last whole run are never merged either.
* Round 1: in each window the even slots are destinations, the odd ones sources; sources and destinations are
  paired one to one, greedily by cosine similarity of the metric (the best remaining pair first). Round 2 pairs
  the pairs the same way, and so on: up to 4 rounds, ratio up to 15/16.
* The last round needed may be partial: then only the most similar of its pairs (over the whole grid) merge,
  as many as the ratio asks for; the rest stay as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]  # frames, height, width (in tokens)
Window = tuple[int, int, int]

WINDOW_TOKENS = 16
SNAP = 0.05  # share of a round's pairs under which a partial round is dropped (or, from the top, completed)
# Window shapes (frames, height, width) by name; each holds WINDOW_TOKENS tokens.
WINDOWS: dict[str, Window] = {"spatial": (1, 4, 4), "spatial+temporal": (2, 2, 4)}


@dataclass(frozen=True)
class PairLayout:
    """Static index tensors (int64) of one grid: the tokens never merged and the windows of the rest."""

    num_tokens: int
    fixed: torch.Tensor  # [S] token ids never merged (protected frames, then the tail after the last window)
    windows: torch.Tensor  # [nWin, WINDOW_TOKENS] token ids, window-local order
    mergeable: int  # tokens after the protected frames (what ``ratio`` is a share of)

    def to(self, device: torch.device) -> "PairLayout":
        return PairLayout(self.num_tokens, self.fixed.to(device), self.windows.to(device), self.mergeable)


@lru_cache(maxsize=64)
def _layout_cpu(grid: Grid, window: Window, protect_frames: int) -> PairLayout | None:
    frames, height, width = grid
    f0 = min(max(protect_frames, 0), frames)
    fm = frames - f0
    if fm <= 0:
        return None
    wt, wh, ww = window
    t = torch.arange(fm)[:, None, None]
    h = torch.arange(height)[None, :, None]
    w = torch.arange(width)[None, None, :]
    blocks_h, blocks_w = -(-height // wh), -(-width // ww)
    # Sort key (t // wt, h // wh, w // ww, t % wt, h % wh, w % ww): whole windows become runs of 16 tokens;
    # edge windows are smaller and consecutive ones share a run (neighbours along the width).
    order_key = ((((t // wt) * blocks_h + h // wh) * blocks_w + w // ww) * wt + t % wt) * wh * ww + (h % wh) * ww + w % ww
    tok = ((t + f0) * height + h) * width + w
    ordered = tok.flatten()[order_key.flatten().argsort()]
    n_win = ordered.numel() // WINDOW_TOKENS
    cut = n_win * WINDOW_TOKENS
    return PairLayout(
        num_tokens=frames * height * width,
        fixed=torch.cat([torch.arange(f0 * height * width), ordered[cut:]]),
        windows=ordered[:cut].view(n_win, WINDOW_TOKENS).contiguous(),
        mergeable=fm * height * width,
    )


_DEVICE_LAYOUTS: dict[tuple, PairLayout] = {}


def pair_layout(grid: Grid, window: str, protect_frames: int, device: torch.device) -> PairLayout | None:
    """The (cached) layout of ``grid`` on ``device``; None if no window fits."""
    key = (tuple(grid), window, protect_frames, str(device))
    layout = _DEVICE_LAYOUTS.get(key)
    if layout is None:
        cpu = _layout_cpu(tuple(grid), WINDOWS[window], protect_frames)
        if cpu is None or cpu.windows.shape[0] == 0:
            return None
        layout = cpu.to(device)
        if len(_DEVICE_LAYOUTS) > 64:
            _DEVICE_LAYOUTS.clear()
        _DEVICE_LAYOUTS[key] = layout
    return layout


def tokens_to_remove(layout: PairLayout, ratio: float) -> int:
    """How many tokens a plan merges away: ``ratio`` of the tokens after the protected frames.

    At most what four full rounds remove. A last round that would merge almost none (or almost all) of its pairs
    is dropped (or completed): it would add a size group of a few keys, one more attention call for nothing.
    """
    n_win = layout.windows.shape[0]
    target = max(0, min(int(round(ratio * layout.mergeable)), n_win * (WINDOW_TOKENS - 1)))
    removed, pairs = 0, n_win * WINDOW_TOKENS // 2
    while pairs >= n_win and target > removed:
        take = target - removed
        if take >= pairs:
            removed += pairs
            pairs //= 2
            continue
        if take <= SNAP * pairs:
            return removed
        if take >= (1 - SNAP) * pairs:
            return removed + pairs
        return target
    return removed


def greedy_pairs(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one pairing of ``sim`` [..., k sources, k destinations], best remaining pair first.

    Returns ``partner`` [..., k]: the source paired with each destination, and ``score`` [..., k]: that pair's
    similarity. k passes of one argmax over each k x k block; NaN counts as the lowest similarity.
    """
    *lead, k, k2 = sim.shape
    if k != k2:
        raise ValueError(f"need as many sources as destinations, got {k} x {k2}")
    clean = torch.nan_to_num(sim.detach().float(), nan=-2.0, posinf=2.0, neginf=-2.0).reshape(-1, k, k)
    s = clean.clone()
    rows = torch.arange(s.shape[0], device=s.device)
    partner = torch.empty(s.shape[0], k, dtype=torch.int64, device=s.device)
    taken = float("-inf")
    for _ in range(k):  # k launches of a few tiny kernels each; the pair scores are read back once at the end
        idx = s.view(s.shape[0], k * k).argmax(dim=1)
        src = torch.div(idx, k, rounding_mode="floor")
        dst = idx - src * k
        partner[rows, dst] = src
        s[rows, src, :] = taken
        s[rows, :, dst] = taken
    score = clean.gather(1, partner.unsqueeze(1)).squeeze(1)
    return partner.view(*lead, k), score.view(*lead, k)


@dataclass
class PairPlan:
    """Which tokens each reduced key stands for, grouped by how many; ``reduce`` applies it to keys or values."""

    layout: PairLayout
    groups: list[tuple[int, torch.Tensor]]  # (tokens per key, member ids [B, M, size]), sizes ascending
    _rows: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def sizes(self) -> list[int]:
        """Tokens per key of each group ``reduce`` returns, ascending (the first is 1 when any key is unmerged)."""
        return [s for s, _ in self._output_groups()]

    @property
    def num_keys(self) -> int:
        return sum(m for _, m in self._output_groups())

    def _output_groups(self) -> list[tuple[int, int]]:
        counts = [(s, ids.shape[1]) for s, ids in self.groups]
        n_fixed = self.layout.fixed.numel()
        if n_fixed:
            if counts and counts[0][0] == 1:
                counts[0] = (1, counts[0][1] + n_fixed)
            else:
                counts.insert(0, (1, n_fixed))
        return counts

    def reduce(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, N, C] -> one [B, M_g, C] tensor per size group (``sizes`` order): the mean of each key's members."""
        b, n, c = x.shape
        flat = x.reshape(b * n, c)
        out: list[torch.Tensor] = []
        fixed = self.layout.fixed
        if fixed.numel() and (not self.groups or self.groups[0][0] != 1):
            out.append(x[:, fixed])
        for (size, _), rows in zip(self.groups, self._flat_ids(b, n)):
            g = _mean_of_rows(flat, rows).view(b, -1, c)
            if size == 1 and fixed.numel():
                g = torch.cat([x[:, fixed], g], dim=1)
            out.append(g)
        return out

    def _flat_ids(self, b: int, n: int) -> list[torch.Tensor]:
        """Member ids per group as rows of the [B * N, C] view: [size, B * M] (cached: keys and values share them)."""
        if self._rows is None:
            offset = torch.arange(b, device=self.layout.windows.device).mul_(n).view(b, 1, 1)
            # column-major: column j holds every key's j-th member, contiguous for index_select
            self._rows = [(ids + offset).reshape(-1, size).t().contiguous() for size, ids in self.groups]
        return self._rows

    def log_size(self, device: torch.device | None = None) -> torch.Tensor:
        """[M] float32: log(tokens per key) in ``reduce``'s concatenated order (for an additive-bias kernel)."""
        parts = [torch.full((m,), math.log(s), dtype=torch.float32, device=device) for s, m in self._output_groups()]
        return torch.cat(parts)


def _mean_of_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``flat[rows[j]]`` over j; rows [size, M], size a power of two; equal members stay exactly equal.

    Sizes 2 and 4: a tree of ``index_select`` + ``lerp(a, b, 0.5)``, 3x faster than a fused ``embedding_bag`` mean
    on an H100 for Wan's 5120-wide keys. From 8 members on the fused mean wins (one kernel instead of 2 * size - 1).
    Both measured in bench/RESULTS.md ("Token merge, round 3").
    """
    size = rows.shape[0]
    if size == 1:
        return flat.index_select(0, rows[0])
    if size >= 8:
        return F.embedding_bag(rows.t(), flat, mode="mean")
    half = size // 2
    return torch.lerp(_mean_of_rows(flat, rows[:half]), _mean_of_rows(flat, rows[half:]), 0.5)


def plan_pairs(
    metric: torch.Tensor,
    grid: Grid,
    ratio: float,
    window: str = "spatial+temporal",
    protect_frames: int = 1,
) -> PairPlan | None:
    """Pair tokens by ``metric`` [B, N, D] (e.g. keys averaged over heads); None if nothing would merge."""
    b, n, _ = metric.shape
    if n != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"metric has {n} tokens but the grid {grid} has {grid[0] * grid[1] * grid[2]}")
    layout = pair_layout(grid, window, protect_frames, metric.device)
    if layout is None:
        return None
    remove = tokens_to_remove(layout, ratio)
    if remove == 0:
        return None
    n_win = layout.windows.shape[0]
    with torch.no_grad():
        feat = F.normalize(metric.float(), dim=-1)[:, layout.windows]  # [B, nWin, 16, D]
        members = layout.windows.expand(b, n_win, WINDOW_TOKENS).unsqueeze(-1)  # [B, nWin, clusters, size]
        removed = 0
        while True:
            k = members.shape[2] // 2
            size = members.shape[3]
            dst_f, src_f = feat[:, :, 0::2], feat[:, :, 1::2]
            partner, score = greedy_pairs(src_f @ dst_f.transpose(-1, -2))  # per destination
            src_m = members[:, :, 1::2].gather(2, partner.unsqueeze(-1).expand(-1, -1, -1, size))
            pairs = torch.cat([members[:, :, 0::2], src_m], dim=-1)  # [B, nWin, k, 2 * size]
            this_round = n_win * k
            if removed + this_round <= remove:
                removed += this_round
                members = pairs
                if removed == remove or k == 1:
                    groups = [(2 * size, members.flatten(1, 2))]
                    break
                src_f = src_f.gather(2, partner.unsqueeze(-1).expand(-1, -1, -1, src_f.shape[-1]))
                feat = F.normalize(dst_f + src_f, dim=-1)
                continue
            # Partial round: only the most similar pairs merge; the rest stay two keys of ``size`` tokens.
            take = remove - removed
            order = score.flatten(1).argsort(dim=1, descending=True)
            flat = pairs.flatten(1, 2)  # [B, nWin * k, 2 * size]
            chosen = flat.gather(1, order[:, :take, None].expand(-1, -1, 2 * size))
            rest = flat.gather(1, order[:, take:, None].expand(-1, -1, 2 * size)).reshape(b, -1, size)
            groups = [(size, rest), (2 * size, chosen)]
            break
    return PairPlan(layout=layout, groups=groups)
