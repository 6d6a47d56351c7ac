"""Loading, offload wiring, sampling, cancel and decoding on the tiny Wan model, without a server."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vramwise.decode import TilingMode, TilingOptions, decode_latents
from vramwise.errors import InputError, SamplingError
from vramwise.handles import VramwiseModel
from vramwise.loader import LoadOptions, PipelineCache, load_pipeline
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.sampling import generate

from engine_helpers import Cancelled, Recorder
from engine_helpers import tiny_wan_request as _request

CPU = torch.device("cpu")




@pytest.fixture(scope="module")
def wan(tiny_models_root):
    loaded = load_pipeline(LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.NONE, WeightDtype.BF16), CPU)
    return VramwiseModel(loaded)


def test_sampling_reports_every_step_and_checks_cancel_before_each_model_call(wan):
    rec = Recorder()
    latent = generate(wan, _request(steps=3), rec)
    assert rec.steps == [(1, 3), (2, 3), (3, 3)]
    assert rec.checks >= 3 * 2  # cond + uncond model calls per step
    assert latent.samples.shape == (1, 16, 2, 8, 8)
    assert latent.samples.device.type == "cpu" and latent.fps == 16


def test_cancel_stops_the_run_and_leaves_the_pipeline_usable(wan):
    with pytest.raises(Cancelled):
        generate(wan, _request(steps=5), Recorder(cancel_at=2))
    assert "step" not in wan.loaded.pipe.scheduler.__dict__  # the progress wrapper was removed
    assert all(not m._forward_pre_hooks for m in wan.loaded.denoisers)
    again = Recorder()
    generate(wan, _request(steps=2), again)
    assert len(again.steps) == 2


def test_same_seed_same_latents_other_seed_differs(wan):
    a = generate(wan, _request(seed=5)).samples
    b = generate(wan, _request(seed=5)).samples
    c = generate(wan, _request(seed=6)).samples
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_gives_frames_of_the_requested_size_tiled_or_not(wan):
    latent = generate(wan, _request(num_frames=9, width=64, height=48))
    untiled, note = decode_latents(wan, latent, TilingOptions(TilingMode.OFF))
    tiled, tiled_note = decode_latents(wan, latent, TilingOptions(TilingMode.ON, tile=64, overlap=16))
    assert untiled.shape == tiled.shape == (9, 48, 64, 3)
    assert 0.0 <= float(untiled.min()) and float(untiled.max()) <= 1.0
    assert "untiled" in note and "tiled 64px" in tiled_note


def test_auto_tiling_tiles_only_when_the_estimate_does_not_fit(wan, monkeypatch):
    import vramwise.decode as decode

    latent = generate(wan, _request())
    monkeypatch.setattr(decode, "free_bytes", lambda device: 10**12)
    assert "untiled" in decode_latents(wan, latent, TilingOptions(TilingMode.AUTO))[1]
    monkeypatch.setattr(decode, "free_bytes", lambda device: 1)
    assert "tiled 256px" in decode_latents(wan, latent, TilingOptions(TilingMode.AUTO))[1]


def test_bad_tile_settings_name_the_input(wan):
    latent = generate(wan, _request())
    with pytest.raises(InputError, match="tile_overlap"):
        decode_latents(wan, latent, TilingOptions(TilingMode.ON, tile=128, overlap=128))


@pytest.mark.parametrize("tiling", [TilingOptions(TilingMode.OFF), TilingOptions(TilingMode.ON, tile=64, overlap=16)])
def test_cancel_during_decode_stops_within_a_block_and_leaves_no_hooks(wan, tiling):
    latent = generate(wan, _request(num_frames=9, width=96, height=96))
    calls = []

    def count_only():
        calls.append(1)

    decode_latents(wan, latent, tiling, check_cancel=count_only)
    total = len(calls)
    assert total > 9  # checked before the decoder and its blocks for each latent frame / tile, not once

    seen = []

    def cancel_at_third():
        seen.append(1)
        if len(seen) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        decode_latents(wan, latent, tiling, check_cancel=cancel_at_third)
    assert len(seen) == 3  # nothing ran on after the cancel
    decoder = wan.loaded.pipe.vae.decoder
    assert all(not m._forward_pre_hooks for m in decoder.modules())
    frames, _ = decode_latents(wan, latent, tiling)
    assert frames.shape == (9, 96, 96, 3)


def test_decoding_with_another_family_is_refused(wan, tiny_models_root):
    other = VramwiseModel(load_pipeline(LoadOptions(tiny_models_root / "tiny-wan22-ti2v-5b", OffloadMode.NONE, WeightDtype.BF16), CPU))
    latent = generate(wan, _request())
    with pytest.raises(InputError, match="latent: it was sampled with a wan2.1-i2v model"):
        decode_latents(other, latent, TilingOptions())


# Modes that only move weights; modes that also batch CFG passes are checked in their own tests.
PLACEMENT_MODES = [OffloadMode.NONE, OffloadMode.MODEL, OffloadMode.GROUP, OffloadMode.SEQUENTIAL]


@pytest.mark.parametrize("mode", PLACEMENT_MODES, ids=lambda m: m.value)
def test_every_offload_mode_gives_the_resident_result(tiny_models_root, wan, mode):
    reference = generate(wan, _request()).samples
    loaded = load_pipeline(
        LoadOptions(tiny_models_root / "tiny-wan21-i2v", mode, WeightDtype.BF16, text_encoder_on_cpu=True), CPU
    )
    assert any("no CUDA device" in n for n in loaded.notes) == (mode is not OffloadMode.NONE)
    assert loaded.pipe._execution_device == CPU
    result = generate(VramwiseModel(loaded), _request()).samples
    torch.testing.assert_close(result, reference, rtol=0, atol=1e-2)


def test_fp8_storage_keeps_weights_in_fp8_and_norms_in_bf16(tiny_models_root):
    loaded = load_pipeline(LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.NONE, WeightDtype.FP8_E4M3FN), CPU)
    transformer = loaded.pipe.transformer
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert any(d == torch.float8_e4m3fn for n, d in dtypes.items() if "ffn" in n)
    assert all(d != torch.float8_e4m3fn for n, d in dtypes.items() if "norm" in n or "patch_embedding" in n)
    latent = generate(VramwiseModel(loaded), _request())
    assert torch.isfinite(latent.samples).all()


def test_nan_weights_give_a_sampling_error_with_a_fix(tiny_models_root, tmp_path):
    import shutil

    broken = tmp_path / "nan-wan"
    shutil.copytree(tiny_models_root / "tiny-wan21-i2v", broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("proj_out.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights)
    model = VramwiseModel(load_pipeline(LoadOptions(broken, OffloadMode.NONE, WeightDtype.BF16), CPU))
    with pytest.raises(SamplingError, match="NaN/inf.*Fix"):
        generate(model, _request())


def test_cache_reuses_same_options_and_releases_changed_ones(tiny_models_root):
    cache = PipelineCache()
    a = LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.NONE, WeightDtype.BF16)
    b = LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.GROUP, WeightDtype.BF16)
    first, reused = cache.get_or_load("7", a, CPU)
    assert not reused
    again, reused = cache.get_or_load("7", a, CPU)
    assert reused and again is first
    generation = cache.generation
    second, reused = cache.get_or_load("7", b, CPU)
    assert not reused and first.released and first.pipe is None
    assert cache.generation > generation and len(cache) == 1
    shared, reused = cache.get_or_load("8", b, CPU)
    assert reused and shared is second
    cache.release("7")
    assert not second.released  # still used by slot 8
    cache.release_all()
    assert second.released and len(cache) == 0


def test_released_pipeline_is_revived_in_place(tiny_models_root):
    cache = PipelineCache()
    options = LoadOptions(tiny_models_root / "tiny-wan21-i2v", OffloadMode.NONE, WeightDtype.BF16)
    loaded, _ = cache.get_or_load("1", options, CPU)
    model = VramwiseModel(loaded)
    cache.release_all()
    assert model.loaded.released
    cache.revive(model.loaded)
    assert not model.loaded.released
    assert generate(model, _request()).samples.shape == (1, 16, 2, 8, 8)


def test_a_patched_clone_leaves_the_original_handle_untouched(wan):
    class Marker:
        name = "marker"
        attached = 0

        def attach(self, model, run):
            Marker.attached += 1
            assert run.latent_frames == 2 and run.latent_height == 8
            return lambda: None

        def on_step(self, step, total):
            pass

    clone = wan.with_patch(Marker())
    assert wan.patches == () and len(clone.patches) == 1 and clone.loaded is wan.loaded
    generate(clone, _request())
    assert Marker.attached == 1
