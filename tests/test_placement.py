"""The Placement a loaded pipeline owns: what the loader and the planner put there, the hooks later features use
(weight patchers, stream engines, CFG batchers) and the architecture descriptions the engine reads."""

from __future__ import annotations

import pytest
import torch

from vramwise.architectures import ARCHITECTURES, EASYANIMATE, WAN, DenoiserArchitecture, architecture_of
from vramwise.loader import PipelineCache
from vramwise.memory import planner
from vramwise.offload import OffloadMode
from vramwise.offload.stream import StreamOffload, StreamSettings
from vramwise.sampling import generate

from engine_helpers import load_tiny, tiny_wan_request
from test_stream_offload import _inputs, _tiny_transformer

CPU = torch.device("cpu")


def _all_attribute_names(obj) -> set[str]:
    names = set(vars(obj))
    for m in getattr(obj, "components", {}).values():
        if isinstance(m, torch.nn.Module):
            for sub in m.modules():
                names.update(vars(sub))
    return names


# ---- what the loader and the planner record ---------------------------------------------------------------------
def test_auto_with_the_sequential_fp8_plan_keeps_the_text_encoder_on_the_cpu(tiny_models_root):
    """The planner's fp8 skip patterns once replaced the components kept off the GPU (``text_encoder_on_cpu``)."""
    folder = tiny_models_root / "tiny-wan21-i2v"
    planner.set_floor(str(folder), planner.PLANS[-1])
    try:
        m = load_tiny(folder, "auto", text_on_cpu=True)
    finally:
        planner.clear_floors()
    placement, pipe = m.loaded.placement, m.loaded.pipe
    assert placement.plan.plan == planner.PLANS[-1] and placement.mode == "sequential"
    assert hasattr(pipe.transformer, "_hf_hook"), "the denoiser goes through accelerate's sequential offload"
    assert not hasattr(pipe.text_encoder, "_hf_hook"), "the CPU text encoder must be left out of the offload"
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.parameters())
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.patch_embedding.weight.dtype != torch.float8_e4m3fn  # a skip pattern kept it
    assert "text_encoder runs on the CPU" in m.loaded.notes
    assert torch.isfinite(generate(m, tiny_wan_request(steps=1)).samples).all()


def test_stream_placement_is_reachable_from_the_handle_and_nothing_is_stored_on_the_pipeline(tiny_models_root):
    m = load_tiny(tiny_models_root / "tiny-wan22-i2v-a14b", "stream")
    placement, pipe = m.loaded.placement, m.loaded.pipe
    assert [e.model for e in placement.stream_engines] == [pipe.transformer, pipe.transformer_2]
    assert [b.model for b in placement.cfg_batchers] == [pipe.transformer, pipe.transformer_2]
    assert placement.cfg_batched and placement.mode == "stream" and not placement.compiled
    assert "stream" in placement.describe() and "CFG batched" in placement.describe()
    assert not [n for n in _all_attribute_names(pipe) if "vramwise" in n]
    generate(m, tiny_wan_request(steps=1))
    assert not any(e.active for e in placement.stream_engines), "a run ends with placement.release()"
    # the qualified name of a Linear, from a map the placement owns
    assert placement.name_of(pipe.transformer_2.blocks[1].attn1.to_q) == "transformer_2.blocks.1.attn1.to_q"
    assert placement.name_of(pipe.transformer.blocks[0]) is None


def test_a_reload_keeps_the_compile_choice_on_the_new_placement(tiny_models_root):
    cache = PipelineCache()
    from vramwise.loader import LoadOptions
    from vramwise.precision import WeightDtype

    opts = LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.STREAM, WeightDtype.BF16)
    loaded, _ = cache.get_or_load("s", opts, CPU)
    note = loaded.placement.set_compile("off")
    assert note.startswith("compile: off")
    old = loaded.placement
    cache.release_all()
    cache.revive(loaded)
    assert loaded.placement is not old and loaded.placement.compile_choice == "off"
    assert loaded.placement.stream_engines and loaded.placement.stream_engines[0].model is loaded.pipe.transformer


# ---- weight patchers -----------------------------------------------------------------------------------------------
class _Patcher:
    """Adds ``delta`` to one Linear's weight, either in the resident slot or where the lean forward takes it."""

    def __init__(self, block_index: int, delta: float, in_slot: bool) -> None:
        self.block_index, self.delta, self.in_slot = block_index, delta, in_slot
        self.resident: list[int] = []
        self.transformed: list[torch.nn.Module] = []
        self.target: torch.nn.Module | None = None

    def on_block_resident(self, block_index: int, block: torch.nn.Module) -> None:
        self.resident.append(block_index)
        if self.in_slot and block_index == self.block_index:
            block.ffn.net[2].weight.data.add_(self.delta)

    def transform_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        self.transformed.append(module)
        if not self.in_slot and module is self.target:
            return weight + self.delta
        return weight


def _engine(root, patchers=None, layers=3):
    model = _tiny_transformer(root, layers=layers)
    eng = StreamOffload(model, CPU, StreamSettings(depth=1), weight_patchers=patchers)
    return model, eng


@torch.no_grad()
@pytest.mark.parametrize("in_slot", [True, False], ids=["on_block_resident", "transform_weight"])
def test_a_weight_patcher_changes_the_output_exactly_as_the_patched_weight_would(tiny_models_root, in_slot):
    x, t, ctx, _, img = _inputs(2)
    # the same weights with the delta applied before packing: what a patcher must reproduce
    edited, _ = _engine(tiny_models_root)
    edited.blocks[1].ffn.net[2].weight.data.add_(0.05)
    expected = edited(x, t, ctx, img, return_dict=False)[0]

    patchers: list = []
    model, eng = _engine(tiny_models_root, patchers)
    plain = model(x, t, ctx, img, return_dict=False)[0]
    eng.release()
    host_before = eng.layouts[1].host.clone()
    patcher = _Patcher(1, 0.05, in_slot)
    patcher.target = model.blocks[1].ffn.net[2]
    patchers.append(patcher)
    out = model(x, t, ctx, img, return_dict=False)[0]
    eng.release()
    assert torch.equal(out, expected) and not torch.equal(out, plain)
    assert torch.equal(eng.layouts[1].host, host_before), "the packed host buffer is never touched"
    assert patcher.resident == [0, 1, 2]
    if not in_slot:
        assert patcher.target in patcher.transformed
    patchers.remove(patcher)
    # slot edits vanish with the slot: the next run without the patcher is the plain output again
    assert torch.equal(model(x, t, ctx, img, return_dict=False)[0], plain)


@torch.no_grad()
def test_a_block_that_stays_in_its_slot_is_shown_to_the_patchers_once_per_fill(tiny_models_root):
    patcher = _Patcher(0, 0.0, True)
    model, eng = _engine(tiny_models_root, [patcher], layers=2)  # 2 blocks, 2 slots: nothing is refilled
    x, t, ctx, _, img = _inputs(3)
    model(x, t, ctx, img)
    model(x, t, ctx, img)
    assert patcher.resident == [0, 1]
    eng.release()
    model(x, t, ctx, img)
    assert patcher.resident == [0, 1, 0, 1]


@torch.no_grad()
def test_an_empty_patcher_list_gives_bit_identical_outputs(tiny_models_root):
    x, t, ctx, _, img = _inputs(4)
    a, _ = _engine(tiny_models_root, [])
    b, _ = _engine(tiny_models_root, [_Patcher(0, 0.0, False)])  # identity patcher: same arithmetic
    assert torch.equal(a(x, t, ctx, img, return_dict=False)[0], b(x, t, ctx, img, return_dict=False)[0])


# ---- architecture descriptions -----------------------------------------------------------------------------------
def test_the_engine_reads_the_architecture_descriptions(tiny_models_root):
    wan = _tiny_transformer(tiny_models_root, layers=2)
    assert architecture_of(wan) is WAN and ARCHITECTURES["easyanimate"] is EASYANIMATE
    assert WAN.self_attention_modules(wan) == [b.attn1 for b in wan.blocks]
    assert WAN.patch_thw(wan) == tuple(wan.config.patch_size)
    assert architecture_of(torch.nn.Linear(2, 2)) is None


class ToyDenoiser(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
                                           for _ in range(3)])
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x)


@torch.no_grad()
def test_a_new_architecture_is_one_description(monkeypatch):
    toy = ToyDenoiser().eval()
    x = torch.randn(2, 4)
    ref = toy(x)
    arch = DenoiserArchitecture(
        name="toy", model_classes=("ToyDenoiser",), block_class="Sequential", blocks="layers",
        self_attention="0", cross_attention=None, ffn="0", norms=(), self_attention_processor="none",
        patch_axes="hw", transient_modules=("embed",), default_latent=(3, 4, 5))
    monkeypatch.setitem(ARCHITECTURES, "toy", arch)
    eng = StreamOffload(toy, CPU, StreamSettings(depth=1))
    assert eng.blocks == list(toy.layers) and eng.transient == [toy.embed] and eng.lean is None
    assert torch.equal(toy(x), ref)

    class Pipe:
        transformer = toy

    assert planner.default_run_for(Pipe(), ("transformer",)) == planner.RunShape(3, 4, 5, True)
