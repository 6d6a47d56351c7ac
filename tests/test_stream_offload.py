"""The stream offload engine on the CPU: ordering, slot reuse, exact outputs, CFG batching, pinned-memory cap."""

from __future__ import annotations

import pytest
import torch

from vramwise.errors import InputError
from vramwise.offload.cfg_batching import CfgBatcher
from vramwise.offload.stream import StreamOffload, StreamSettings, repeated_blocks


def _tiny_transformer(root, layers=None):
    from diffusers import WanTransformer3DModel

    path = root / "tiny-wan21-i2v" / "transformer"
    if layers is None:
        return WanTransformer3DModel.from_pretrained(path).eval()
    config = dict(WanTransformer3DModel.load_config(path))
    config["num_layers"] = layers
    torch.manual_seed(3)
    return WanTransformer3DModel.from_config(config).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36, 3, 8, 8, generator=g)
    t = torch.tensor([500])
    ctx = torch.randn(1, 512, 32, generator=g)
    neg = torch.randn(1, 512, 32, generator=g)
    img = torch.randn(1, 257, 16, generator=g)
    return x, t, ctx, neg, img


@torch.no_grad()
def test_prefetch_order_and_slot_reuse(tiny_models_root):
    model = _tiny_transformer(tiny_models_root, layers=5)
    x, t, ctx, _, img = _inputs()
    eng = StreamOffload(model, torch.device("cpu"), StreamSettings(depth=1), trace=True)
    assert len(repeated_blocks(model)) == 5
    model(x, t, ctx, img)
    slots = [s.data_ptr() for s in eng._slots]
    model(x, t, ctx, img)
    assert [s.data_ptr() for s in eng._slots] == slots, "slot buffers must be reused, not reallocated"
    runs = [(i, s) for kind, i, s in eng.trace if kind == "run"]
    assert [i for i, _ in runs] == [0, 1, 2, 3, 4] * 2
    # block i+1 is loaded before block i runs (one-ahead prefetch), through a ring of 2 slots
    first = eng.trace[:6]
    assert first == [("load", 0, 0), ("run", 0, 0), ("load", 1, 1), ("run", 1, 1), ("load", 2, 0), ("run", 2, 0)]
    assert {s for _, s in runs} == {0, 1}


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_outputs_identical_to_the_unoffloaded_model(tiny_models_root, depth):
    model = _tiny_transformer(tiny_models_root, layers=4)
    x, t, ctx, _, img = _inputs(1)
    ref = model(x, t, ctx, img, return_dict=False)[0]
    eng = StreamOffload(model, torch.device("cpu"), StreamSettings(depth=depth, ffn_chunk_tokens=16))
    for _ in range(2):
        out = model(x, t, ctx, img, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    eng.release()
    eng.remove()
    torch.testing.assert_close(model(x, t, ctx, img, return_dict=False)[0], ref, rtol=0, atol=1e-6)


@torch.no_grad()
def test_fp8_storage_halves_host_bytes_and_stays_close(tiny_models_root):
    model = _tiny_transformer(tiny_models_root)
    x, t, ctx, _, img = _inputs(2)
    ref = model(x, t, ctx, img, return_dict=False)[0]
    plain = StreamOffload(_tiny_transformer(tiny_models_root), torch.device("cpu")).block_bytes
    eng = StreamOffload(model, torch.device("cpu"), StreamSettings(fp8_linear=True))
    assert eng.block_bytes < plain
    out = model(x, t, ctx, img, return_dict=False)[0]
    assert (out - ref).norm() / ref.norm() < 0.1


@torch.no_grad()
def test_cfg_batching_matches_two_passes(tiny_models_root):
    model = _tiny_transformer(tiny_models_root)
    x, t, ctx, neg, img = _inputs(3)
    ref_c = model(x, t, ctx, img, return_dict=False)[0]
    ref_u = model(x, t, neg, img, return_dict=False)[0]
    eng = StreamOffload(model, torch.device("cpu"))
    batcher = CfgBatcher(model)
    for _ in range(3):  # step 1 learns the negatives, later steps batch
        c = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                  return_dict=False)[0]
        u = model(hidden_states=x, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
                  return_dict=False)[0]
        torch.testing.assert_close(c, ref_c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u, ref_u, rtol=1e-4, atol=1e-5)
    assert batcher.stats["batched"] == 2 and batcher.stats["served"] == 2
    batcher.reset()
    batcher.set_negative(neg)
    c = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img)
    assert batcher.stats["batched"] == 3
    torch.testing.assert_close(c.sample, ref_c, rtol=1e-4, atol=1e-5)
    batcher.detach()
    # the batcher gives back what it wrapped: the engine's lean forward
    assert model.__dict__.get("forward") == eng.lean._model_forward
    eng.remove()
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_cfg_batching_falls_back_to_two_passes_on_oom(tiny_models_root):
    model = _tiny_transformer(tiny_models_root)
    x, t, ctx, neg, img = _inputs(4)
    ref_u = model(x, t, neg, img, return_dict=False)[0]
    batcher = CfgBatcher(model)
    batcher.set_negative(neg)
    inner = batcher._inner

    def flaky(*args, **kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs.shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return inner(*args, **kwargs)

    batcher._inner = flaky
    model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img, return_dict=False)
    u = model(hidden_states=x, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
              return_dict=False)[0]
    torch.testing.assert_close(u, ref_u)
    assert batcher.stats["fallback"] == 1 and not batcher.enabled


def test_pinned_memory_cap_is_refused_naming_offload_mode(tiny_models_root):
    model = _tiny_transformer(tiny_models_root)
    with pytest.raises(InputError) as err:
        StreamOffload(model, torch.device("cpu"), StreamSettings(pinned_cap_bytes=1024))
    assert err.value.input_name == "offload_mode"
    assert "GiB" in str(err.value) and "fp8" in str(err.value)
