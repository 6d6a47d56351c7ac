"""Out-of-memory step-downs outside the denoiser, on the CPU with fake OOMs: decode retries tiled with smaller
tiles, a text-encoder OOM reloads with the text encoder on the CPU, and runs leave no scheduler state behind."""

from __future__ import annotations

import torch

from vramwise.decode import TilingMode, TilingOptions, decode_latents
from vramwise.handles import VramwiseModel
from vramwise.loader import LoadOptions, PipelineCache
from vramwise.memory.planned_run import drop_scheduler_state, generate_with_plan
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype

from engine_helpers import Recorder
from engine_helpers import tiny_wan_request as _request

CPU = torch.device("cpu")


def _load(root, mode=OffloadMode.STREAM):
    cache = PipelineCache()
    loaded, _ = cache.get_or_load("s", LoadOptions(root / "tiny-wan21-i2v", mode, WeightDtype.BF16), CPU)
    return cache, VramwiseModel(loaded)


def test_decode_oom_retries_tiled_then_with_smaller_tiles(tiny_models_root, monkeypatch):
    cache, model = _load(tiny_models_root, OffloadMode.NONE)
    latent, _ = generate_with_plan(model, _request(), Recorder(), cache=cache)
    family = model.loaded.family
    real_decode, real_tiling = family.decode, family.vae_tiling
    seen = []

    def tiling(loaded, enabled, tile, overlap):
        seen.append((enabled, tile, overlap))
        return real_tiling(loaded, enabled, tile, overlap)

    def decode(loaded, samples):
        if len(seen) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (fake)")
        return real_decode(loaded, samples)

    monkeypatch.setattr(family, "vae_tiling", tiling)
    monkeypatch.setattr(family, "decode", decode)
    frames, note = decode_latents(model, latent, TilingOptions(TilingMode.OFF, 256, 64))
    assert seen == [(False, 256, 64), (True, 256, 64), (True, 128, 32)]
    assert frames.shape[0] == 5
    assert "retried tiled 256px" in note and "retried tiled 128px/32px" in note


def test_decode_gives_up_at_the_smallest_tile(tiny_models_root, monkeypatch):
    cache, model = _load(tiny_models_root, OffloadMode.NONE)
    latent, _ = generate_with_plan(model, _request(), Recorder(), cache=cache)

    def decode(loaded, samples):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(model.loaded.family, "decode", decode)
    import pytest

    with pytest.raises(torch.OutOfMemoryError):
        decode_latents(model, latent, TilingOptions(TilingMode.ON, 128, 32))


def test_text_encoder_oom_moves_the_text_encoder_to_the_cpu_and_retries(tiny_models_root):
    cache, model = _load(tiny_models_root, OffloadMode.STREAM)
    first_pipe = model.loaded.pipe

    def boom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.00 GiB (fake)")

    first_pipe.text_encoder.register_forward_pre_hook(boom)
    latent, report = generate_with_plan(model, _request(), Recorder(), cache=cache)
    assert any("text encoder" in line and "CPU" in line for line in report), report
    assert model.loaded.options.text_encoder_on_cpu and model.loaded.pipe is not first_pipe
    assert torch.isfinite(latent.samples).all()


def test_an_oom_elsewhere_is_not_blamed_on_the_text_encoder(tiny_models_root):
    cache, model = _load(tiny_models_root, OffloadMode.STREAM)

    def boom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    handle = model.loaded.pipe.image_encoder.register_forward_pre_hook(boom)
    import pytest

    with pytest.raises(torch.OutOfMemoryError):
        generate_with_plan(model, _request(), Recorder(), cache=cache)
    handle.remove()
    assert not model.loaded.options.text_encoder_on_cpu


def test_scheduler_state_on_the_cpu_is_left_alone(tiny_models_root):
    cache, model = _load(tiny_models_root, OffloadMode.STREAM)
    generate_with_plan(model, _request(), Recorder(), cache=cache)
    sched = model.loaded.pipe.scheduler
    before = dict(vars(sched))
    tensors = [k for k, v in before.items() if isinstance(v, torch.Tensor)]
    lists = [k for k, v in before.items() if isinstance(v, list) and any(isinstance(t, torch.Tensor) for t in v)]
    assert tensors, "the scheduler keeps per-run tensors"
    drop_scheduler_state(model.loaded.pipe)
    assert all(vars(sched)[k] is v for k, v in before.items())  # already on the CPU: the same objects
    # A device they are not on (``meta`` stands in for the GPU): every tensor and tensor list moves, nothing else.
    drop_scheduler_state(model.loaded.pipe, to=torch.device("meta"))
    assert all(vars(sched)[k].device.type == "meta" for k in tensors)
    assert all(t.device.type == "meta" for k in lists for t in vars(sched)[k] if isinstance(t, torch.Tensor))
    assert all(vars(sched)[k] is v for k, v in before.items() if k not in tensors and k not in lists)
