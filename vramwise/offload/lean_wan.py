"""A memory-lean forward for diffusers' Wan transformer, used by the ``stream`` engine.

The stock block keeps several whole-sequence tensors alive at once (queries, keys, values, the attention output,
fp32 copies of the hidden states for the norms and the gated residuals): at 480x832x81 with both CFG passes one
such bf16 tensor is 0.62 GiB and an fp32 one 1.25 GiB. This forward computes the same thing along the token axis in
chunks of ``chunk_rows`` (batch x tokens) rows:

- self-attention: pass 1 fills the keys and values of all tokens chunk by chunk; pass 2, per query chunk,
  computes the queries, attends to all keys, projects and adds the gated result into the output rows;
- cross-attention and the feed-forward are row-wise, so they run chunk by chunk in place on the output;
- the model's output norm and projection run chunk by chunk as well;
- when the model forward owns the hidden states (it made them), blocks update them in place, so the block's input
  and output are one tensor.

So the whole-sequence tensors alive in a block are the hidden states plus the keys and values; the rest is one
chunk's worth. fp8 weights are upcast one Linear at a time (each upcast lives while its layer runs over the chunks),
so the engine keeps fp8 blocks fp8 on the GPU. The arithmetic is the stock one (fp32 norms and modulation per
chunk), so results match the stock forward up to matmul tiling.

The per-chunk pieces are pure functions of tensors, so ``compiled=True`` compiles them once (one graph per chunk
shape, shared by all blocks) while the orchestration (buffers, in-place writes) stays eager.

Used only where the structure is exactly the stock one (diffusers WanTransformerBlock with the default attention
processors, plain Linear layers, no other hooks or forward overrides); anything else runs the stock forward. The one
exception is token merging's self-attention processor: it hands this forward merged keys/values
(``reduce_for_lean``) and the queries attend to them chunk by chunk, so merging keeps the lean memory profile.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..architectures import WAN
from ..token_merge.attention import size_grouped_attention

DEFAULT_CHUNK_ROWS = 4096


# ---- pure per-chunk pieces ---------------------------------------------------------------------------------------
def _modulated_norm(x, shift, scale, eps: float):
    return (F.layer_norm(x.float(), (x.shape[-1],), None, None, eps) * (1 + scale) + shift).to(x.dtype)


def _rms(x, weight, eps: float):
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def _rotate(x, cos, sin):
    """Rotary embedding on interleaved pairs; x (B, n, heads, head_dim), cos/sin (1, n, 1, head_dim)."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


def _attend(q, k, v):
    """q (B, n, H, d), k/v (B, m, H, d) -> (B, n, H*d)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2).to(q.dtype)


def kv_piece(x, shift, scale, cos, sin, wk, bk, nk, wv, bv, heads: int, eps: float, qk_eps: float, k_out, v_out):
    n = _modulated_norm(x, shift, scale, eps)
    k_out.copy_(_rotate(_rms(F.linear(n, wk, bk), nk, qk_eps).unflatten(2, (heads, -1)), cos, sin))
    v_out.copy_(F.linear(n, wv, bv).unflatten(2, (heads, -1)))


def self_attn_piece(x, shift, scale, gate, cos, sin, wq, bq, nq, k, v, wo, bo, heads: int, eps: float,
                    qk_eps: float):
    n = _modulated_norm(x, shift, scale, eps)
    q = _rotate(_rms(F.linear(n, wq, bq), nq, qk_eps).unflatten(2, (heads, -1)), cos, sin)
    o = F.linear(_attend(q, k, v), wo, bo)
    x.copy_((x.float() + o * gate).to(x.dtype))


def self_attn_groups_piece(x, shift, scale, gate, cos, sin, wq, bq, nq, keys, values, sizes: tuple, impl: str,
                           wo, bo, heads: int, eps: float, qk_eps: float):
    """``self_attn_piece`` over merged keys/values in size groups (token merging; see token_merge.attention)."""
    n = _modulated_norm(x, shift, scale, eps)
    q = _rotate(_rms(F.linear(n, wq, bq), nq, qk_eps).unflatten(2, (heads, -1)), cos, sin)
    o = size_grouped_attention(q.transpose(1, 2), [k.transpose(1, 2) for k in keys],
                               [v.transpose(1, 2) for v in values], sizes, impl)
    o = F.linear(o.transpose(1, 2).flatten(2).to(q.dtype), wo, bo)
    x.copy_((x.float() + o * gate).to(x.dtype))


def cross_attn_piece(x, nw, nb, eps: float, affine_norm: bool, wq, bq, nq, k, v, k_img, v_img, wo, bo, heads: int,
                     qk_eps: float):
    if affine_norm:
        n = F.layer_norm(x.float(), (x.shape[-1],), None if nw is None else nw.float(),
                         None if nb is None else nb.float(), eps).to(x.dtype)
    else:
        n = x
    q = _rms(F.linear(n, wq, bq), nq, qk_eps).unflatten(2, (heads, -1))
    o = _attend(q, k, v)
    if k_img is not None:
        o = o + _attend(q, k_img, v_img)
    x.copy_(x + F.linear(o, wo, bo))


def ffn_piece(x, shift, scale, gate, w1, b1, w2, b2, approximate: str, eps: float):
    n = _modulated_norm(x, shift, scale, eps)
    o = F.linear(F.gelu(F.linear(n, w1, b1), approximate=approximate), w2, b2)
    x.copy_((x.float() + o.float() * gate).to(x.dtype))


def tail_piece(x, shift, scale, eps: float, w, b, out):
    out.copy_(F.linear((F.layer_norm(x.float(), (x.shape[-1],), None, None, eps) * (1 + scale) + shift).to(x.dtype),
                       w, b))


PIECES = {f.__name__: f for f in (kv_piece, self_attn_piece, self_attn_groups_piece, cross_attn_piece, ffn_piece,
                                  tail_piece)}
_COMPILED: dict[str, Callable] = {}


def compiled_pieces() -> dict[str, Callable]:
    """The pieces under torch.compile (created once per process; graphs are cached per chunk shape and dtype)."""
    if not _COMPILED:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED.update({k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in PIECES.items()})
    return _COMPILED


# ---- structure checks ---------------------------------------------------------------------------------------------
def _diffusers_wan():
    try:
        from diffusers.models.transformers import transformer_wan as tw
    except Exception:  # noqa: BLE001 - diffusers missing or changed: no lean path
        return None
    return tw


def _plain_linear(m: Any) -> bool:
    return type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _merges_for_lean(processor: Any) -> bool:
    """A token-merge processor (token_merge.dit) that hands this forward merged keys/values instead of running."""
    return callable(getattr(processor, "reduce_for_lean", None)) and hasattr(processor, "original")


def block_supported(block: torch.nn.Module) -> bool:
    """True when ``block`` is diffusers' stock Wan block as this forward knows it (checked at every call)."""
    tw = _diffusers_wan()
    if tw is None or type(block) is not tw.WanTransformerBlock:
        return False
    try:
        a1, a2, ffn = block.attn1, block.attn2, block.ffn
        for a in (a1, a2):
            # token merging wraps the stock self-attention processor; the wrapped one must be the stock one
            stock = a.processor.original if a is a1 and _merges_for_lean(a.processor) else a.processor
            if type(stock) is not tw.WanAttnProcessor or getattr(a, "fused_projections", False):
                return False
            if getattr(a.processor, "_attention_backend", None) is not None:
                return False
            if getattr(a.processor, "_parallel_config", None) is not None:
                return False
            if not all(_plain_linear(l) for l in (a.to_q, a.to_k, a.to_v, a.to_out[0])):
                return False
        if a1.add_k_proj is not None:
            return False
        if a2.add_k_proj is not None and not (_plain_linear(a2.add_k_proj) and _plain_linear(a2.add_v_proj)):
            return False
        net = ffn.net
        if len(net) < 3 or not hasattr(net[0], "approximate") or not _plain_linear(net[0].proj):
            return False
        if not _plain_linear(net[2]) or any(type(m) is not torch.nn.Dropout for m in list(net)[3:]):
            return False
        if type(getattr(a1, "norm_q", None)).__name__ != "RMSNorm":
            return False
    except AttributeError:
        return False
    return _no_hooks_inside(block)


def _no_hooks_inside(block: torch.nn.Module) -> bool:
    for sub in block.modules():
        if sub is block:
            continue
        if sub._forward_hooks or sub._forward_pre_hooks:
            return False
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            return False
    return True


def model_supported(model: torch.nn.Module) -> bool:
    tw = _diffusers_wan()
    return (tw is not None and type(model) is tw.WanTransformer3DModel and "forward" not in model.__dict__
            and type(model.norm_out).__name__ == "FP32LayerNorm" and _plain_linear(model.proj_out))


# ---- the forward ------------------------------------------------------------------------------------------------
class LeanWan:
    """Installs the lean forward on a Wan transformer and its blocks; ``remove`` restores the stock ones."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], compute_dtype: torch.dtype,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, compiled: bool = False,
                 weight_patchers: list | None = None) -> None:
        self.model = model
        # The placement's run-scoped weight patchers (the same list object: patches come and go between runs).
        self.weight_patchers = weight_patchers if weight_patchers is not None else []
        self._forwards: dict[int, Callable] = {}  # id(block) -> the lean forward installed on it
        self.compute_dtype = compute_dtype
        self.chunk_rows = max(1, int(chunk_rows))
        self.compiled = False
        self._pieces: dict[str, Callable] = dict(PIECES)
        self.set_compiled(compiled)
        self._owned: torch.Tensor | None = None
        self.blocks: list[torch.nn.Module] = []
        self.stats = {"lean_blocks": 0}
        for b in blocks:
            if "forward" in b.__dict__ or not block_supported(b):
                continue
            b.forward = self._block_forward_for(b)
            self.blocks.append(b)
        self.model_forward = model_supported(model)
        if self.model_forward:
            model.forward = self._model_forward

    def set_compiled(self, on: bool) -> None:
        self.compiled = bool(on)
        self._pieces = compiled_pieces() if self.compiled else dict(PIECES)

    def covers(self, block: torch.nn.Module) -> bool:
        """Whether ``block``'s next call runs the lean forward (so its fp8 weights may stay fp8)."""
        fwd = self._forwards.get(id(block))
        return fwd is not None and block.__dict__.get("forward") is fwd and block_supported(block)

    def remove(self) -> None:
        for b in self.blocks:
            if b.__dict__.get("forward") is self._forwards.get(id(b)):
                del b.forward
        self.blocks.clear()
        self._forwards.clear()
        if self.model_forward and self.model.__dict__.get("forward") == self._model_forward:
            del self.model.forward
        self.model_forward = False

    # -- helpers
    def _w(self, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = linear.weight
        if w.dtype.is_floating_point and w.element_size() == 1:  # fp8 storage: upcast for this layer only
            w = w.to(self.compute_dtype)
        for patcher in self.weight_patchers:
            w = patcher.transform_weight(linear, w)
        b = linear.bias
        if b is not None and b.dtype.is_floating_point and b.element_size() == 1:  # read as fp8 with its weight
            b = b.to(self.compute_dtype)
        return w, b

    def _chunks(self, batch: int, n: int) -> list[tuple[int, int, int]]:
        """(batch row, first token, end token) of each chunk: one batch row at a time, so every chunk of a
        contiguous (B, N, C) tensor is itself contiguous and the pieces write their results straight into it.
        (Spans across the batch were strided: measured on an H200 at 480x832x81, the extra copy kernels they
        needed were ~0.18 s of a 5.86 s CFG step.)"""
        step = max(1, self.chunk_rows)
        return [(b, s, min(n, s + step)) for b in range(batch) for s in range(0, n, step)]

    @staticmethod
    def _rows(t: torch.Tensor, b: int, s: int, e: int, n: int) -> torch.Tensor:
        """Batch row ``b`` of a modulation tensor; per-token modulation (Wan2.2 TI2V) is sliced with the chunk,
        per-sample modulation broadcasts."""
        t = t[b:b + 1]
        return t[:, s:e] if t.dim() == 3 and t.shape[1] == n and n > 1 else t

    def _block_forward_for(self, block: torch.nn.Module) -> Callable:
        stock = type(block).forward.__get__(block)

        def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
            if not block_supported(block):
                return stock(hidden_states, encoder_hidden_states, temb, rotary_emb)
            self.stats["lean_blocks"] += 1
            return self._block(block, hidden_states, encoder_hidden_states, temb, rotary_emb)

        self._forwards[id(block)] = forward
        return forward

    def _block(self, blk, x, ehs, temb, rope):
        P = self._pieces
        if temb.ndim == 4:
            mods = [m.squeeze(2) for m in (blk.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
        else:
            mods = list((blk.scale_shift_table + temb.float()).chunk(6, dim=1))
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        B, N, _ = x.shape
        chunks = self._chunks(B, N)
        r = self._rows
        cos, sin = rope
        a1, a2 = blk.attn1, blk.attn2
        heads = a1.heads
        eps = blk.norm1.eps
        # Every piece updates its chunk of ``out`` in place; a caller's tensor is copied first, never written.
        out = x if self._owned is x else x.clone(memory_format=torch.contiguous_format)

        # 1. self-attention: keys/values of all tokens (from the block's input, before any row is updated),
        #    then queries chunk by chunk
        k_all = x.new_empty(B, N, heads, a1.to_k.out_features // heads)
        v_all = x.new_empty(B, N, heads, a1.to_v.out_features // heads)
        wk, bk = self._w(a1.to_k)
        wv, bv = self._w(a1.to_v)
        for b, s, e in chunks:
            P["kv_piece"](out[b:b + 1, s:e], r(shift, b, s, e, N), r(scale, b, s, e, N), cos[:, s:e], sin[:, s:e],
                          wk, bk, a1.norm_k.weight, wv, bv, heads, eps, a1.norm_k.eps,
                          k_all[b:b + 1, s:e], v_all[b:b + 1, s:e])
        del wk, wv
        # Token merging: the processor reduces the keys/values (None: not this call), the queries stay per chunk.
        merged = a1.processor.reduce_for_lean(k_all, v_all) if _merges_for_lean(a1.processor) else None
        wq, bq = self._w(a1.to_q)
        wo, bo = self._w(a1.to_out[0])
        if merged is not None:
            del k_all, v_all
            keys, values, sizes, impl = merged
            for b, s, e in chunks:
                P["self_attn_groups_piece"](
                    out[b:b + 1, s:e], r(shift, b, s, e, N), r(scale, b, s, e, N), r(gate, b, s, e, N), cos[:, s:e],
                    sin[:, s:e], wq, bq, a1.norm_q.weight, [k[b:b + 1] for k in keys], [v[b:b + 1] for v in values],
                    sizes, impl, wo, bo, heads, eps, a1.norm_q.eps)
            del keys, values, merged
        else:
            for b, s, e in chunks:
                P["self_attn_piece"](
                    out[b:b + 1, s:e], r(shift, b, s, e, N), r(scale, b, s, e, N), r(gate, b, s, e, N), cos[:, s:e],
                    sin[:, s:e], wq, bq, a1.norm_q.weight, k_all[b:b + 1], v_all[b:b + 1], wo, bo, heads, eps,
                    a1.norm_q.eps)
            del k_all, v_all
        del wq, wo

        # 2. cross-attention (text, plus image keys/values for I2V)
        k_img = v_img = None
        ctx = ehs
        if a2.add_k_proj is not None:
            n_img = ehs.shape[1] - WAN.text_tokens
            img, ctx = ehs[:, :n_img], ehs[:, n_img:]
            w, bias = self._w(a2.add_k_proj)
            k_img = _rms(F.linear(img, w, bias), a2.norm_added_k.weight, a2.norm_added_k.eps).unflatten(2, (heads, -1))
            w, bias = self._w(a2.add_v_proj)
            v_img = F.linear(img, w, bias).unflatten(2, (heads, -1))
        w, bias = self._w(a2.to_k)
        k = _rms(F.linear(ctx, w, bias), a2.norm_k.weight, a2.norm_k.eps).unflatten(2, (heads, -1))
        w, bias = self._w(a2.to_v)
        v = F.linear(ctx, w, bias).unflatten(2, (heads, -1))
        del w
        norm2 = blk.norm2
        affine = not isinstance(norm2, torch.nn.Identity)
        nw = getattr(norm2, "weight", None) if affine else None
        nb = getattr(norm2, "bias", None) if affine else None
        n_eps = getattr(norm2, "eps", eps)
        wq, bq = self._w(a2.to_q)
        wo, bo = self._w(a2.to_out[0])
        for b, s, e in chunks:
            P["cross_attn_piece"](out[b:b + 1, s:e], nw, nb, n_eps, affine, wq, bq, a2.norm_q.weight, k[b:b + 1],
                                  v[b:b + 1], None if k_img is None else k_img[b:b + 1],
                                  None if v_img is None else v_img[b:b + 1], wo, bo, heads, a2.norm_q.eps)
        del wq, wo, k, v, k_img, v_img

        # 3. feed-forward
        net = blk.ffn.net
        w1, b1 = self._w(net[0].proj)
        w2, b2 = self._w(net[2])
        for b, s, e in chunks:
            P["ffn_piece"](out[b:b + 1, s:e], r(c_shift, b, s, e, N), r(c_scale, b, s, e, N), r(c_gate, b, s, e, N),
                           w1, b1, w2, b2, net[0].approximate, blk.norm3.eps)
        return out

    def _model_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None = None,
                       return_dict: bool = True, attention_kwargs: dict | None = None):
        m = self.model
        if attention_kwargs:
            return type(m).forward(m, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                   return_dict=return_dict, attention_kwargs=attention_kwargs)
        B, _, frames, height, width = hidden_states.shape
        pt, ph, pw = m.config.patch_size
        rope = m.rope(hidden_states)
        x = m.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        ts_len = None
        if timestep.ndim == 2:
            ts_len = timestep.shape[1]
            timestep = timestep.flatten()
        temb, tproj, ehs, ehs_img = m.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_len)
        tproj = tproj.unflatten(2 if ts_len is not None else 1, (6, -1))
        if ehs_img is not None:
            ehs = torch.concat([ehs_img, ehs], dim=1)
        try:
            self._owned = x
            for block in m.blocks:
                x = block(x, ehs, tproj, rope)
                self._owned = x
        finally:
            self._owned = None
        if temb.ndim == 3:
            shift, scale = (m.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(x.device), scale.to(x.device)
        N = x.shape[1]
        w, b = self._w(m.proj_out)
        out = x.new_empty(B, N, w.shape[0])
        for bi, s, e in self._chunks(B, N):
            self._pieces["tail_piece"](x[bi:bi + 1, s:e], self._rows(shift, bi, s, e, N),
                                       self._rows(scale, bi, s, e, N), m.norm_out.eps, w, b, out[bi:bi + 1, s:e])
        del x
        out = out.reshape(B, frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


# Lean forwards by architecture (architectures.DenoiserArchitecture.lean_forward).
LEAN_FORWARDS: dict[str, type] = {"wan": LeanWan}

__all__ = ["LeanWan", "LEAN_FORWARDS", "block_supported", "model_supported", "DEFAULT_CHUNK_ROWS"]
