"""The memory-lean chunked Wan forward (used by the stream engine) against the stock diffusers forward, on the CPU."""

from __future__ import annotations

import pytest
import torch

from vramwise.offload.lean_wan import LeanWan, block_supported, model_supported
from vramwise.offload.stream import StreamOffload, StreamSettings, repeated_blocks

from test_stream_offload import _inputs, _tiny_transformer


@torch.no_grad()
@pytest.mark.parametrize("chunk_rows", [7, 64, 10_000])
def test_lean_forward_matches_stock(tiny_models_root, chunk_rows):
    model = _tiny_transformer(tiny_models_root, layers=3)
    x, t, ctx, neg, img = _inputs(2)
    xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
    ref = model(xb, tb, cb, ib, return_dict=False)[0]
    blocks = repeated_blocks(model)
    assert model_supported(model) and all(block_supported(b) for b in blocks)
    lean = LeanWan(model, blocks, torch.float32, chunk_rows=chunk_rows)
    out = model(xb, tb, cb, ib, return_dict=False)[0]
    assert lean.stats["lean_blocks"] == 3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    lean.remove()
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in blocks)
    torch.testing.assert_close(model(xb, tb, cb, ib, return_dict=False)[0], ref)


@torch.no_grad()
def test_lean_block_does_not_touch_a_callers_tensor(tiny_models_root):
    model = _tiny_transformer(tiny_models_root, layers=1)
    blocks = repeated_blocks(model)
    LeanWan(model, blocks, torch.float32, chunk_rows=5)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 12, blocks[0].norm1.normalized_shape[0], generator=g)
    keep = h.clone()
    temb = torch.randn(1, 6, h.shape[-1], generator=g)
    ehs = torch.randn(1, 512 + 257, h.shape[-1], generator=g)
    cos = torch.ones(1, 12, 1, blocks[0].attn1.to_q.out_features // blocks[0].attn1.heads)
    blocks[0](h, ehs, temb, (cos, torch.zeros_like(cos)))
    assert torch.equal(h, keep), "only the model forward's own hidden states may be updated in place"


@torch.no_grad()
def test_swapped_processor_falls_back_to_stock(tiny_models_root):
    model = _tiny_transformer(tiny_models_root, layers=2)
    x, t, ctx, _, img = _inputs(3)
    ref = model(x, t, ctx, img, return_dict=False)[0]
    blocks = repeated_blocks(model)
    lean = LeanWan(model, blocks, torch.float32, chunk_rows=8)

    class Other(type(blocks[0].attn1.processor)):
        pass

    blocks[0].attn1.processor = Other()  # e.g. another pack's processor
    assert not lean.covers(blocks[0]) and lean.covers(blocks[1])
    torch.testing.assert_close(model(x, t, ctx, img, return_dict=False)[0], ref, rtol=1e-4, atol=1e-5)
    assert lean.stats["lean_blocks"] == 1


@torch.no_grad()
def test_stream_engine_with_lean_forward_and_fp8_blocks_kept_fp8(tiny_models_root):
    model = _tiny_transformer(tiny_models_root, layers=3).to(torch.bfloat16)
    x, t, ctx, _, img = [v.to(torch.bfloat16) if v.is_floating_point() else v for v in _inputs(4)]
    ref_model = _tiny_transformer(tiny_models_root, layers=3).to(torch.bfloat16)
    ref = ref_model(x, t, ctx, img, return_dict=False)[0].float()
    eng = StreamOffload(model, torch.device("cpu"), StreamSettings(depth=1, fp8_linear=True, chunk_rows=16))
    assert eng.lean is not None and len(eng.lean.blocks) == 3
    out = model(x, t, ctx, img, return_dict=False)[0].float()
    # the lean forward ran on fp8 weights directly: the whole-block upcast buffer was never needed
    assert eng._upcast is None
    assert eng.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    err = (out - ref).abs().mean() / ref.abs().mean()
    assert err < 0.15, err  # fp8 weights: close, not equal
    eng.remove()


@torch.no_grad()
def test_condition_embedder_is_transient(tiny_models_root):
    model = _tiny_transformer(tiny_models_root, layers=2)
    eng = StreamOffload(model, torch.device("cpu"), StreamSettings(depth=1))
    assert eng.transient == [model.condition_embedder]
    assert all(m is not model.condition_embedder for m in eng.resident_modules())
    x, t, ctx, _, img = _inputs(5)
    model(x, t, ctx, img)
    eng.release()
    assert model.condition_embedder.time_proj.weight.device.type == "cpu"


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-wan22-ti2v-5b", "tiny-wan22-i2v-a14b"])
def test_lean_forward_matches_stock_for_wan22(tiny_models_root, name):
    """TI2V-5B: per-token timesteps (modulation sliced with the chunk); A14B: no image keys/values."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_models_root / name / "transformer").eval()
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, 3, 8, 8, generator=g)
    t = torch.full((2, 3 * 4 * 4), 500) if "ti2v" in name else torch.tensor([500, 500])
    ctx = torch.randn(2, 512, c.text_dim, generator=g)
    ref = model(x, t, ctx, return_dict=False)[0]
    lean = LeanWan(model, repeated_blocks(model), torch.float32, chunk_rows=6)
    torch.testing.assert_close(model(x, t, ctx, return_dict=False)[0], ref, rtol=1e-4, atol=1e-5)
    assert lean.stats["lean_blocks"] == c.num_layers


@torch.no_grad()
def test_token_merge_keeps_the_lean_forward_and_matches_the_merged_stock_forward(tiny_models_root):
    from vramwise.token_merge import DitMergeSettings, patch_dit

    model = _tiny_transformer(tiny_models_root, layers=3)
    x, t, ctx, neg, img = _inputs(5)
    xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
    handle = patch_dit(model, DitMergeSettings(ratio=0.5))
    ref = model(xb, tb, cb, ib, return_dict=False)[0]  # merged, diffusers' block forward
    assert handle.state.calls == 3
    blocks = repeated_blocks(model)
    assert all(block_supported(b) for b in blocks)
    lean = LeanWan(model, blocks, torch.float32, chunk_rows=16)
    out = model(xb, tb, cb, ib, return_dict=False)[0]
    assert lean.stats["lean_blocks"] == 3 and handle.state.calls == 6
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    handle.set_active(False)  # outside the step range: the plain lean forward
    plain = model(xb, tb, cb, ib, return_dict=False)[0]
    assert handle.state.calls == 6 and not torch.allclose(plain, out, atol=1e-4)
    lean.remove()
    handle.detach()



@torch.no_grad()
def test_pieces_under_compile_update_their_chunk_in_place(tiny_models_root, monkeypatch):
    """The pieces write into the chunk they are given (no copy back by the orchestration); traced with
    fullgraph=True and functionalized (aot_eager), the in-place writes must give the eager result."""
    import vramwise.offload.lean_wan as lean_mod

    model = _tiny_transformer(tiny_models_root, layers=2)
    x, t, ctx, neg, img = _inputs(2)
    xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
    ref = model(xb, tb, cb, ib, return_dict=False)[0]
    traced = {k: torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
              for k, f in lean_mod.PIECES.items()}
    monkeypatch.setattr(lean_mod, "compiled_pieces", lambda: traced)
    lean = LeanWan(model, repeated_blocks(model), torch.float32, chunk_rows=16, compiled=True)
    out = model(xb, tb, cb, ib, return_dict=False)[0]
    assert lean.stats["lean_blocks"] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    lean.remove()
