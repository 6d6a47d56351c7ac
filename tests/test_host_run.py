"""Host RAM estimate of a run (vramwise/memory/host_run.py): refusal up front with sizes that fit, the allocator's
own failure said as an input error, and Cancel inside one long forward."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import vramwise.device
from vramwise.decode import TilingMode, TilingOptions, decode_latents
from vramwise.errors import InputError
from vramwise.handles import VramwiseLatent
from vramwise.memory.host_run import RunSize, check_host_run, estimate_host_run
from vramwise.sampling import generate

from engine_helpers import Cancelled, Recorder, load_tiny
from engine_helpers import tiny_wan_request as _request

GIB = 2**30


@pytest.fixture(scope="module")
def wan(tiny_models_root):
    return load_tiny(tiny_models_root / "tiny-wan21-i2v")


def test_estimate_grows_with_every_input_and_counts_activations_only_on_a_cpu(wan):
    size = RunSize.of(wan.loaded)
    assert size.compute_on_host and size.latent_channels == 36
    base = estimate_host_run(size, 832, 480, 81, True)
    for bigger in ((1664, 480, 81), (832, 960, 81), (832, 480, 161)):
        assert estimate_host_run(size, *bigger, True).peak > base.peak
    # decoded frames alone: float32 [F, H, W, 3] on the host
    assert base.decode >= 81 * 480 * 832 * 3 * 4
    on_gpu = estimate_host_run(dataclasses.replace(size, compute_on_host=False), 832, 480, 81, True)
    assert on_gpu.denoise < base.denoise and on_gpu.decode < base.decode


def test_a_run_that_cannot_fit_is_refused_with_sizes_that_do(wan):
    size = RunSize.of(wan.loaded)
    with pytest.raises(InputError) as err:
        check_host_run(size, wan.family, 4096, 4096, 81, True, available=24 * GIB)
    message = str(err.value)
    assert err.value.input_name == "width/height/num_frames" and "24.0 GiB is available" in message
    fix = err.value.fix
    # Both suggestions fit, and are valid sizes for the family.
    frames = int(re.search(r"num_frames (\d+) or fewer at 4096x4096", fix).group(1))
    w, h = (int(v) for v in re.search(r"(\d+)x(\d+) or smaller at 81 frames", fix).groups())
    assert (frames - 1) % 4 == 0 and w % 16 == 0 and h % 16 == 0 and w == h
    check_host_run(size, wan.family, 4096, 4096, frames, True, available=24 * GIB)
    check_host_run(size, wan.family, w, h, 81, True, available=24 * GIB)
    with pytest.raises(InputError):
        check_host_run(size, wan.family, w + 16, h + 16, 81, True, available=24 * GIB)


def test_sampling_a_request_too_big_for_host_ram_is_refused_before_any_work(wan, monkeypatch):
    monkeypatch.setattr(vramwise.device, "host_available_bytes", lambda: 4 * GIB)
    rec = Recorder()
    with pytest.raises(InputError, match="width/height/num_frames: 4096x4096x81"):
        generate(wan, _request(width=4096, height=4096, num_frames=81), rec)
    assert rec.checks == 0  # refused before the VAE encoder or the transformer ran
    monkeypatch.undo()
    assert generate(wan, _request(), Recorder()).samples.shape == (1, 16, 2, 8, 8)


def test_decode_too_big_for_host_ram_is_refused_and_tiling_lowers_the_need(wan, monkeypatch):
    latent = generate(wan, _request(num_frames=9, width=128, height=128))
    big = VramwiseLatent(torch.zeros(1), latent.family_id, 4096, 4096, 801, latent.fps)
    monkeypatch.setattr(vramwise.device, "host_available_bytes", lambda: 8 * GIB)
    with pytest.raises(InputError, match="for decoding"):
        decode_latents(wan, big, TilingOptions(TilingMode.OFF))
    size = RunSize.of(wan.loaded)
    assert estimate_host_run(size, 4096, 4096, 81, False, vae_tile=256).decode < \
        estimate_host_run(size, 4096, 4096, 81, False).decode


def test_the_allocators_own_failure_becomes_an_input_error(wan, monkeypatch):
    def no_memory(*args, **kwargs):
        torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's real error (1 PiB cannot be had)

    monkeypatch.setattr(type(wan.family), "sample", no_memory)
    with pytest.raises(InputError) as err:
        generate(wan, _request(num_frames=9))
    assert err.value.input_name == "width/height/num_frames" and "ran out of host memory" in str(err.value)
    monkeypatch.undo()
    assert generate(wan, _request(), Recorder()).samples.shape == (1, 16, 2, 8, 8)


def test_cancel_lands_between_transformer_blocks_of_one_forward(wan):
    blocks = wan.loaded.pipe.transformer.blocks
    rec = Recorder()
    generate(wan, _request(steps=1, cfg=1.0), rec)
    assert rec.checks > 1 + len(blocks)  # the model call, each block, the VAE encoder's blocks

    class CancelAtBlock(Recorder):
        armed = False

        def check_cancel(self) -> None:
            super().check_cancel()
            if self.armed:
                raise Cancelled("cancelled inside the forward")

    observer = CancelAtBlock()
    ran = []

    def arm(module, args):  # runs before the cancel check on the same block
        observer.armed = True

    arm_handle = blocks[1].register_forward_pre_hook(arm, prepend=True)
    done_handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        with pytest.raises(Cancelled):
            generate(wan, _request(steps=1, cfg=1.0), observer)
    finally:
        arm_handle.remove()
        for h in done_handles:
            h.remove()
    assert ran == [0]  # block 0 finished, block 1 never ran: the forward stopped within one block
    assert all(not b._forward_pre_hooks for b in blocks)
    assert all(not m._forward_pre_hooks for m in wan.loaded.pipe.vae.modules())
