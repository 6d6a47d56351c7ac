"""Token merging for video DiTs (Wan, EasyAnimate) as a swap of the self-attention processors.

The chosen blocks' self-attention processors are replaced by ones that compute queries, keys and values as
the stock processor does (projections, q/k norms, RoPE), then merge similar keys/values in pairs before attention
(``pairing``) and weight each merged key by the tokens it stands for (``attention``). Processors are plain
objects, not modules, so offload hooks (accelerate, diffusers group offload) and fp8 layerwise casting, which sit
on the projection layers and blocks, work unchanged.

Whenever the patch should not act (outside the step range, an unexpected call, context parallel), the
replacement calls the stock processor it replaced, so the result is exactly the unpatched one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import torch.nn.functional as F

from ..architectures import architecture_of
from .attention import default_impl, prepare_kernels, size_grouped_attention
from .pairing import Grid, pair_layout, plan_pairs


@dataclass(frozen=True)
class DitMergeSettings:
    ratio: float
    window: str = "spatial+temporal"
    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    protect_frames: int = 1
    # None: attention.default_impl for the device of each call
    attention_impl: str | None = None


@dataclass
class MergeState:
    """Shared by one denoiser's replacement processors for one run."""

    settings: DitMergeSettings
    active: bool = True
    grid: Grid | None = None
    calls: int = 0  # attention calls that merged (for tests and notes)


def dit_kind(denoiser: torch.nn.Module) -> str | None:
    """The denoiser's architecture name when this module has a merging processor for it (``_REPLACEMENTS``)."""
    arch = architecture_of(denoiser)
    return arch.name if arch is not None and arch.name in _REPLACEMENTS else None


def _impl(state: MergeState, device: torch.device) -> str:
    return state.settings.attention_impl or default_impl(device)


# ----------------------------------------------------------------------------- Wan


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: channel pairs (2i, 2i+1) rotated by the angle whose cos/sin sit at 2i / 2i+1."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    rotated = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)
    return rotated.type_as(x)


class WanTokenMergeProcessor:
    """Self-attention of a ``WanAttention`` (``blocks[i].attn1``) with merged keys/values."""

    def __init__(self, original: Any, state: MergeState) -> None:
        self.original = original
        self.state = state

    # Read by diffusers' backend / parallel helpers; mirror the stock processor's settings.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        st = self.state
        grid = st.grid
        if (
            not st.active
            or encoder_hidden_states is not None
            or attention_mask is not None
            or rotary_emb is None
            or kwargs
            or getattr(attn, "add_k_proj", None) is not None
            or self._parallel_config is not None  # keys sharded over GPUs: a local merge would be wrong
            or grid is None
            or grid[0] * grid[1] * grid[2] != hidden_states.shape[1]
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        fused = getattr(attn, "fused_projections", False)
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), None
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        heads = attn.heads
        query = _wan_rope(query.unflatten(2, (heads, -1)), *rotary_emb).transpose(1, 2)
        key = _wan_rope(key.unflatten(2, (heads, -1)), *rotary_emb)  # [B, N, heads, D]

        s = st.settings
        plan = plan_pairs(key.mean(dim=2), grid, s.ratio, s.window, s.protect_frames)
        if plan is None:
            value = attn.to_v(hidden_states) if value is None else value
            out = F.scaled_dot_product_attention(
                query, key.transpose(1, 2), value.unflatten(2, (heads, -1)).transpose(1, 2)
            )
        else:
            st.calls += 1

            def heads_first(groups: list[torch.Tensor]) -> list[torch.Tensor]:
                return [g.unflatten(2, (heads, -1)).transpose(1, 2) for g in groups]

            keys = heads_first(plan.reduce(key.flatten(2)))
            key = None  # the full keys are the largest tensor here: free them before attention
            if value is None:
                # Values have no norm and no RoPE: the projection of the merged inputs is the merge of the
                # projections (it is linear), at the cost of half (or less) of the tokens.
                # One projection call for all groups (an offload hook on to_v then moves its weight once).
                merged = plan.reduce(hidden_states)
                values = heads_first(list(attn.to_v(torch.cat(merged, dim=1)).split([g.shape[1] for g in merged], 1)))
            else:
                values = heads_first(plan.reduce(value))
            out = size_grouped_attention(query, keys, values, plan.sizes, _impl(st, query.device))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


    def reduce_for_lean(
        self, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, ...], str] | None:
        """For a forward that computes self-attention itself (the stream engine's lean forward): the merged key
        and value groups [B, M_g, heads, D] of full-sequence keys (after RoPE) and values [B, N, heads, D], their
        sizes and the attention implementation; None when this call should not merge."""
        st = self.state
        grid = st.grid
        if (not st.active or grid is None or self._parallel_config is not None
                or grid[0] * grid[1] * grid[2] != key.shape[1]):
            return None
        s = st.settings
        plan = plan_pairs(key.mean(dim=2), grid, s.ratio, s.window, s.protect_frames)
        if plan is None:
            return None
        st.calls += 1
        heads = key.shape[2]
        keys = [g.unflatten(2, (heads, -1)) for g in plan.reduce(key.flatten(2))]
        values = [g.unflatten(2, (heads, -1)) for g in plan.reduce(value.flatten(2))]
        return keys, values, tuple(plan.sizes), _impl(st, key.device)


# ----------------------------------------------------------------------------- EasyAnimate


class EasyAnimateTokenMergeProcessor:
    """Joint text+video self-attention of an EasyAnimate block; only video keys/values are merged."""

    def __init__(self, original: Any, state: MergeState) -> None:
        self.original = original
        self.state = state

    # Attention.forward drops keyword arguments the processor's __call__ does not name: keep the stock names.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state
        grid = st.grid
        if (
            not st.active
            or encoder_hidden_states is None
            or attention_mask is not None
            or image_rotary_emb is None
            or attn.is_cross_attention
            or grid is None
            or grid[0] * grid[1] * grid[2] != hidden_states.shape[1]
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        joint = attn.add_q_proj is None
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1) if joint else hidden_states

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        query, key, value = heads_first(attn.to_q(x)), heads_first(attn.to_k(x)), heads_first(attn.to_v(x))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if not joint:
            e_q = heads_first(attn.add_q_proj(encoder_hidden_states))
            e_k = heads_first(attn.add_k_proj(encoder_hidden_states))
            e_v = heads_first(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                e_q = attn.norm_added_q(e_q)
            if attn.norm_added_k is not None:
                e_k = attn.norm_added_k(e_k)
            query = torch.cat([e_q, query], dim=2)
            key = torch.cat([e_k, key], dim=2)
            value = torch.cat([e_v, value], dim=2)
        # RoPE on the video part only (text tokens first), as the stock processor does.
        query = torch.cat([query[:, :, :text_len], apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)], dim=2)
        video_k = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)  # [B, heads, N, D]
        video_v = value[:, :, text_len:]

        s = st.settings
        plan = plan_pairs(video_k.mean(dim=1), grid, s.ratio, s.window, s.protect_frames)
        text_k, text_v = key[:, :, :text_len], value[:, :, :text_len]
        if plan is None:
            out = F.scaled_dot_product_attention(
                query, torch.cat([text_k, video_k], dim=2), torch.cat([text_v, video_v], dim=2)
            )
        else:
            st.calls += 1
            b, h, n, d = video_k.shape

            def reduce(t: torch.Tensor) -> list[torch.Tensor]:
                groups = plan.reduce(t.transpose(1, 2).flatten(2))
                return [g.unflatten(2, (h, d)).transpose(1, 2) for g in groups]

            keys, values, sizes = reduce(video_k), reduce(video_v), list(plan.sizes)
            # Text tokens are never merged: they join the size-1 group.
            if sizes[0] == 1:
                keys[0] = torch.cat([text_k, keys[0]], dim=2)
                values[0] = torch.cat([text_v, values[0]], dim=2)
            else:
                keys, values, sizes = [text_k, *keys], [text_v, *values], [1, *sizes]
            out = size_grouped_attention(query, keys, values, sizes, _impl(st, query.device))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        text_out, video_out = out[:, :text_len], out[:, text_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


# ----------------------------------------------------------------------------- attach / detach

# The merging processor per architecture (architectures.DenoiserArchitecture.name); the block list, the
# self-attention module and the stock processor it replaces come from the architecture description.
_REPLACEMENTS = {"wan": WanTokenMergeProcessor, "easyanimate": EasyAnimateTokenMergeProcessor}


def self_attention_modules(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every block, in order."""
    if dit_kind(denoiser) is None:
        raise ValueError(f"{type(denoiser).__name__} is not a supported video DiT")
    return architecture_of(denoiser).self_attention_modules(denoiser)


def _grid_hook(denoiser: torch.nn.Module, kind: str, state: MergeState) -> Callable[..., None]:
    pt, ph, pw = architecture_of(denoiser).patch_thw(denoiser)
    head_dim = int(denoiser.config.attention_head_dim)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.ndim == 5:
            state.grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
            # Eager work for the blocks, which may run compiled (stream engine): the window layout of this grid
            # and the attention kernel are looked up there, never computed.
            if state.active:
                s = state.settings
                pair_layout(state.grid, s.window, s.protect_frames, x.device)
                prepare_kernels(x.device, head_dim)
        else:
            state.grid = None

    return hook


@dataclass
class DitPatchHandle:
    """What ``patch_dit`` did to one denoiser; ``detach`` undoes it exactly."""

    state: MergeState
    swapped: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)
    hook: Any = None
    skipped: list[int] = field(default_factory=list)  # blocks whose processor was not the stock one

    def set_active(self, active: bool) -> None:
        self.state.active = active

    def detach(self) -> None:
        for module, original in reversed(self.swapped):
            module.set_processor(original)
        self.swapped.clear()
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def patch_dit(denoiser: torch.nn.Module, settings: DitMergeSettings) -> DitPatchHandle:
    """Swap the self-attention processors of the chosen blocks of a Wan/EasyAnimate transformer."""
    kind = dit_kind(denoiser)
    if kind is None:
        raise ValueError(f"{type(denoiser).__name__} is not a supported video DiT")
    state = MergeState(settings)
    handle = DitPatchHandle(state)
    if settings.ratio <= 0:
        return handle
    modules = self_attention_modules(denoiser)
    first = max(0, settings.skip_first_blocks)
    last = len(modules) - max(0, settings.skip_last_blocks)
    replacement = _REPLACEMENTS[kind]
    stock = architecture_of(denoiser).self_attention_processor
    for i in range(first, last):
        module = modules[i]
        original = module.processor
        # Only the stock processor is replaced: another patch's processor is left alone (its math is unknown).
        if type(original).__name__ != stock:
            handle.skipped.append(i)
            continue
        module.set_processor(replacement(original, state))
        handle.swapped.append((module, original))
    if handle.swapped:
        handle.hook = denoiser.register_forward_pre_hook(_grid_hook(denoiser, kind, state), with_kwargs=True)
    return handle

