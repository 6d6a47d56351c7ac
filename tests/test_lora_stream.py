"""LoRA fused into the stream engine's GPU slots (``lora.placement.SlotFuser``): the same arithmetic as fusing the
stored weights before packing, the packed host buffers never touched, fp8 slot weights fused at upcast time, and
nothing left once the run is over."""

from __future__ import annotations

import pytest
import torch

import tiny_loras
from test_stream_offload import _inputs, _tiny_transformer
from vramwise.lora import LoraTerm, match_lora, read_lora
from vramwise.lora.placement import SlotFuser
from vramwise.offload.stream import StreamOffload, StreamSettings

CPU = torch.device("cpu")


def _targets(model, path, strength):
    m = match_lora(model, read_lora(path))
    mods = dict(model.named_modules())
    return {mods[n]: [LoraTerm(layer, strength)] for n, layer in m.layers.items() if n.startswith("blocks.")}


@torch.no_grad()
def _fuse_stored(model, targets, upcast_fp8=False):
    """The reference: the same addmm_ on the stored weights (fp8: on their bf16 upcast) before packing."""
    for module, terms in targets.items():
        w = module.weight
        if upcast_fp8:
            w.data = w.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
        for t in terms:
            w.data.addmm_(t.layer.up.to(w.dtype), t.layer.down.to(w.dtype), alpha=t.scale)
            if t.layer.bias is not None:
                module.bias.data.add_(t.layer.bias.to(module.bias.dtype), alpha=t.scale)


@torch.no_grad()
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-slot", "fp8-slot-fused-at-upcast"])
def test_slot_fusion_equals_fusing_the_weights_before_packing(tiny_models_root, tmp_path, fp8):
    x, t, ctx, _, img = (v.bfloat16() if v.is_floating_point() else v for v in _inputs(1))
    model = _tiny_transformer(tiny_models_root, layers=3).bfloat16()
    path = tiny_loras.write_lora(model, tmp_path / "l.safetensors", "lightx2v", scale=0.3)
    ref = _tiny_transformer(tiny_models_root, layers=3).bfloat16()
    _fuse_stored(ref, _targets(ref, path, 0.7), upcast_fp8=fp8)
    StreamOffload(ref, CPU, StreamSettings(depth=1))
    expected = ref(x, t, ctx, img, return_dict=False)[0]

    patchers: list = []
    eng = StreamOffload(model, CPU, StreamSettings(depth=1, fp8_linear=fp8), weight_patchers=patchers)
    plain = model(x, t, ctx, img, return_dict=False)[0]
    eng.release()
    host = [l.host.clone() for l in eng.layouts]
    fuser = SlotFuser(_targets(model, path, 0.7))
    patchers.append(fuser)
    out = model(x, t, ctx, img, return_dict=False)[0]
    eng.release()
    patchers.remove(fuser)
    assert eng.lean is not None and eng.lean.stats["lean_blocks"] > 0  # the lean forward kept running
    assert fuser.fills == 3 and bool(fuser.in_transform) == fp8
    assert torch.equal(out, expected) and not torch.equal(out, plain)
    assert all(torch.equal(l.host, h) for l, h in zip(eng.layouts, host)), "packed host buffers untouched"
    assert torch.equal(model(x, t, ctx, img, return_dict=False)[0], plain)  # slot edits left with the slots
