"""LoRA on the Wan denoisers: every key layout against diffusers' own ``load_lora_weights`` + ``fuse_lora``,
strengths, chaining, every offload mode, no reload on strength changes, and the refusals.

Tolerances: with the denoiser in fp32 our unfused terms and diffusers' fused weights agree to float32 rounding
(measured max 5e-6 on latents of magnitude ~3 after 2 steps): ``FP32_ATOL``. In bf16 (what users run) fused and
unfused round differently at every layer: measured mean |ours - diffusers| is 4% of the LoRA's own effect
(mean |diffusers - no LoRA|), asserted below ``BF16_REL``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_loras
from engine_helpers import load_tiny, tiny_wan_request
from lora_helpers import as_fp32, diffusers_fused, lora_model, tiny_lora
from vramwise.errors import InputError
from vramwise.lora import LoraEntry, LoraPatch, convert, with_lora
from vramwise.sampling import generate

FP32_ATOL = 1e-4
BF16_REL = 0.1


@pytest.fixture(scope="module")
def wan21(tiny_models_root: Path) -> Path:
    return tiny_models_root / "tiny-wan21-i2v"


@pytest.fixture(scope="module")
def model32(wan21: Path):
    return as_fp32(load_tiny(wan21))


@pytest.fixture(scope="module")
def loras(model32, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {layout: tiny_lora(model32, folder, layout, seed=i) for i, layout in enumerate(tiny_loras.LAYOUTS)}


@pytest.fixture(scope="module")
def base32(model32):
    return generate(model32, tiny_wan_request()).samples


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.mark.parametrize("layout", tiny_loras.LAYOUTS)
def test_each_layout_equals_diffusers_fused_output(layout, wan21, model32, loras, base32):
    ours = generate(lora_model(model32, (loras[layout], 0.8)), tiny_wan_request()).samples
    ref = generate(diffusers_fused(wan21, [(loras[layout], 0.8)], fp32=True), tiny_wan_request()).samples
    assert (ref - base32).abs().mean() > 0.05  # the LoRA changes the video
    assert torch.allclose(ours, ref, atol=FP32_ATOL, rtol=0), (ours - ref).abs().max()


def test_bf16_output_is_close_to_diffusers_fused(wan21, loras, tmp_path):
    model = load_tiny(wan21)
    req = tiny_wan_request()
    base = generate(model, req).samples
    ours = generate(lora_model(model, (loras["lightx2v"], 1.0)), req).samples
    ref = generate(diffusers_fused(wan21, [(loras["lightx2v"], 1.0)]), req).samples
    effect = (ref - base).abs().mean()
    assert effect > 0.05
    assert (ours - ref).abs().mean() < BF16_REL * effect


def test_strength_zero_is_bit_identical_to_no_lora(model32, loras, base32):
    out = generate(lora_model(model32, (loras["comfy"], 0.0)), tiny_wan_request()).samples
    assert torch.equal(out, base32)


def test_two_chained_loras_equal_diffusers_two_adapters(wan21, model32, loras):
    chained = lora_model(model32, (loras["comfy"], 0.7), (loras["musubi"], 1.2))
    patches = [p for p in chained.patches if isinstance(p, LoraPatch)]
    assert len(patches) == 1 and len(patches[0].entries) == 2
    ours = generate(chained, tiny_wan_request()).samples
    ref = generate(diffusers_fused(wan21, [(loras["comfy"], 0.7), (loras["musubi"], 1.2)], fp32=True),
                   tiny_wan_request()).samples
    one = generate(lora_model(model32, (loras["comfy"], 0.7)), tiny_wan_request()).samples
    assert (ref - one).abs().mean() > 0.05  # the second LoRA counts
    assert torch.allclose(ours, ref, atol=FP32_ATOL, rtol=0), (ours - ref).abs().max()


def test_chaining_leaves_the_upstream_handle_alone(model32, loras):
    one = with_lora(model32, LoraEntry(loras["comfy"], 1.0))
    two = with_lora(one, LoraEntry(loras["peft"], 0.5))
    assert [len(p.entries) for p in one.patches] == [1]
    assert [len(p.entries) for p in two.patches] == [2]
    assert model32.patches == ()


def test_strength_change_and_removal_reuse_the_loaded_weights(model32, loras, base32, monkeypatch):
    from vramwise.families import wan

    loads = []
    monkeypatch.setattr(wan._WanFamily, "load", lambda self, *a, **k: loads.append(a) or pytest.fail("reload"))
    transformer = model32.loaded.pipe.transformer
    before = _state(transformer)
    req = tiny_wan_request()
    generate(lora_model(model32, (loras["lightx2v"], 1.0)), req)
    reads = len(convert.READS)
    full = generate(lora_model(model32, (loras["lightx2v"], 1.0)), req).samples
    half = generate(lora_model(model32, (loras["lightx2v"], 0.5)), req).samples
    removed = generate(model32, req).samples
    assert not loads
    assert len(convert.READS) == reads  # the LoRA file is not read again either
    assert not torch.equal(full, half) and not torch.equal(half, removed)
    assert torch.equal(removed, base32)
    assert _unchanged(transformer, before)
    assert all(not m._forward_hooks for m in transformer.modules())


@pytest.mark.parametrize("mode,dtype", [("model", "bf16"), ("group", "bf16"), ("sequential", "bf16"),
                                        ("stream", "bf16"), ("none", "fp8_e4m3fn"), ("stream", "fp8_e4m3fn")])
def test_every_offload_mode_applies_the_lora(mode, dtype, wan21, loras):
    req = tiny_wan_request()
    reference = load_tiny(wan21, "none", dtype)
    ref_base = generate(reference, req).samples
    ref = generate(lora_model(reference, (loras["lightx2v"], 1.0)), req).samples
    model = load_tiny(wan21, mode, dtype)
    base = generate(model, req).samples
    out = generate(lora_model(model, (loras["lightx2v"], 1.0)), req).samples
    effect = (ref - ref_base).abs().mean()
    assert effect > 0.05
    assert (out - ref).abs().mean() < BF16_REL * effect
    # detached, stored weights untouched: the next run is the plain model again, bit for bit
    assert torch.equal(generate(model, req).samples, base)


def test_a14b_strength_per_expert(tiny_models_root, tmp_path):
    folder = tiny_models_root / "tiny-wan22-i2v-a14b"
    model = as_fp32(load_tiny(folder))
    path = tiny_lora(model, tmp_path, "comfy")
    req = tiny_wan_request(steps=4, cfg=3.5)
    low_only = with_lora(model, LoraEntry(path, strength=0.0, strength_low_noise=0.9))
    ours = generate(low_only, req).samples
    ref = generate(diffusers_fused(folder, [(path, 0.9)], fp32=True, transformer_2=True), req).samples
    base = generate(model, req).samples
    assert (ref - base).abs().mean() > 0.01
    assert torch.allclose(ours, ref, atol=FP32_ATOL, rtol=0), (ours - ref).abs().max()


def test_lora_for_another_model_fails_naming_file_and_match_count(model32, tmp_path):
    path = tiny_loras.write_wrong_lora(tmp_path / "wan_1.3b_style.safetensors")
    with pytest.raises(InputError) as err:
        generate(lora_model(model32, (path, 1.0)), tiny_wan_request())
    text = str(err.value)
    assert "wan_1.3b_style.safetensors" in text and "0 of 40 keys matched" in text and "20 of another shape" in text
    assert all(not m._forward_hooks for m in model32.loaded.pipe.transformer.modules())


def test_file_that_is_no_wan_lora_fails_naming_it(model32, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(InputError, match="sdxl_lora.safetensors"):
        LoraPatch((LoraEntry(path),)).validate(model32)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(InputError, match="truncated.safetensors"):
        LoraPatch((LoraEntry(bad),)).validate(model32)


def test_partial_lora_runs_and_reports_ignored_keys(model32, base32, tmp_path):
    path = tiny_loras.write_lora(model32.loaded.pipe.transformer, tmp_path / "partial.safetensors", "comfy",
                                 blocks=[0], extra_blocks=[7])
    patched = lora_model(model32, (path, 1.0))
    out = generate(patched, tiny_wan_request()).samples
    assert not torch.equal(out, base32)
    report = patched.patches[0].describe()
    assert "partial.safetensors" in report and "2 ignored" in report and "1 layers not in this model" in report


def _single_file_model(set_paths: dict, diffusion_model: Path, mode: str = "none"):
    from vramwise.handles import VramwiseModel
    from vramwise.loader import LoadOptions, load_pipeline
    from vramwise.offload import OffloadMode
    from vramwise.precision import WeightDtype
    from vramwise.single_file import SingleFileSpec

    spec = SingleFileSpec.create(**dict(set_paths, diffusion_model=diffusion_model))
    options = LoadOptions(diffusion_model, OffloadMode(mode), WeightDtype.BF16, source=spec)
    return VramwiseModel(load_pipeline(options, torch.device("cpu")))


def test_single_file_and_gguf_loaders_take_the_same_lora(wan21, loras, tmp_path):
    """Both loaders build diffusers modules with the same names, so one LoRA path serves a ComfyUI bf16 file and
    a Q8_0 GGUF (whose quantized Linear layers keep their weights quantized: the LoRA is added unfused)."""
    import single_file_helpers as sfh
    from diffusers.quantizers.gguf.utils import GGUFLinear

    files = sfh.write_wan21_set(wan21, tmp_path / "set")
    req = tiny_wan_request()
    folder_model = load_tiny(wan21)
    want = generate(lora_model(folder_model, (loras["lightx2v"], 1.0)), req).samples
    effect = (want - generate(folder_model, req).samples).abs().mean()
    bf16_file = sfh.write_transformer(wan21, tmp_path / "wan_bf16.safetensors", variant="bf16")
    single = generate(lora_model(_single_file_model(files, bf16_file), (loras["lightx2v"], 1.0)), req).samples
    # (the single-file set's text/image encoders are written in fp32, so the runs differ by rounding only)
    assert (single - want).abs().mean() < BF16_REL * effect
    gguf_file = sfh.write_transformer_gguf(wan21, tmp_path / "wan_q8.gguf", "Q8_0", flatten_5d=True)
    gguf_model = _single_file_model(files, gguf_file, "group")
    assert any(isinstance(m, GGUFLinear) for m in gguf_model.loaded.pipe.transformer.modules())
    patched = lora_model(gguf_model, (loras["lightx2v"], 1.0))
    got = generate(patched, req).samples
    # Q8_0 rounds each weight to ~0.4% of its block's largest (test_single_file's tolerance); the LoRA is exact.
    assert (got - want).abs().mean() < BF16_REL * effect
    assert "unfused" in patched.patches[0].describe()


def test_error_mid_run_leaves_no_hooks_and_stored_weights(wan21, loras):
    from engine_helpers import Cancelled, Recorder

    model = load_tiny(wan21, "stream")
    transformer = model.loaded.pipe.transformer
    proj = transformer.proj_out.weight.detach().clone()
    ptr = transformer.proj_out.weight.data_ptr()
    with pytest.raises(Cancelled):
        generate(lora_model(model, (loras["lightx2v"], 1.0)), tiny_wan_request(steps=3), Recorder(cancel_at=1))
    assert transformer.proj_out.weight.data_ptr() == ptr and torch.equal(transformer.proj_out.weight, proj)
    # (the stream engine keeps its own hooks on the blocks and the model; the layers carry none)
    assert all(not m._forward_hooks for m in transformer.modules() if isinstance(m, torch.nn.Linear))


def test_t2v_lora_on_i2v_equals_diffusers_zero_padding(wan21, model32, tmp_path):
    """A Wan2.1 T2V LoRA has no image projections; diffusers pads them with zeros, we leave them alone."""
    path = tiny_lora(model32, tmp_path, "comfy", name="t2v.safetensors", t2v=True)
    ours = generate(lora_model(model32, (path, 1.0)), tiny_wan_request()).samples
    ref = generate(diffusers_fused(wan21, [(path, 1.0)], fp32=True), tiny_wan_request()).samples
    assert torch.allclose(ours, ref, atol=FP32_ATOL, rtol=0), (ours - ref).abs().max()


def test_stream_run_fuses_into_the_slots_and_keeps_the_lean_forward(wan21, loras):
    model = load_tiny(wan21, "stream")
    placement = model.loaded.placement
    eng = placement.stream_engines[0]
    patched = lora_model(model, (loras["lightx2v"], 1.0))
    before = eng.lean.stats["lean_blocks"]
    generate(patched, tiny_wan_request())
    assert eng.lean.stats["lean_blocks"] > before  # no hook inside a block pushed it onto the stock forward
    report = patched.patches[0].describe()
    assert "GPU slots on 24 layers" in report and "stream tail" in report
    assert placement.weight_patchers == []  # the run's patcher is gone with the run
