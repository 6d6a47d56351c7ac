"""Wan2.2 A14B's two experts on two gloo ranks, each rank streaming its blocks through the pack's stream engine
(placement "stream", block buffers shared by the ranks), against both experts in one process; the proxy routes
each call to the right expert."""

from __future__ import annotations

import glob

import pytest
import torch

from vramwise.families import detect_family
from vramwise.parallel import launch_parallel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tiny_models_root):
    return tiny_models_root / "tiny-wan22-i2v-a14b"


@pytest.fixture(scope="module")
def parallel(folder):
    par = launch_parallel(folder, detect_family(folder), 2, torch.bfloat16, CPU, device_type="cpu",
                          placement="stream")
    yield par
    par.shutdown()


def test_both_experts_stream_on_two_ranks_and_match_one_process(parallel, folder):
    from diffusers import WanTransformer3DModel

    assert set(parallel.proxies) == {"transformer", "transformer_2"}
    g = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, 36, 3, 8, 8, generator=g).bfloat16(), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g).bfloat16())
    outs = {}
    for name, proxy in parallel.proxies.items():
        ref_model = WanTransformer3DModel.from_pretrained(folder / name, torch_dtype=torch.bfloat16).eval()
        with torch.no_grad():
            ref = ref_model(**inputs, return_dict=False)[0]
        outs[name] = proxy(**inputs, return_dict=True).sample
        # Same tolerance and reasoning as test_parallel_group.py (bit-identical on this CPU).
        assert (outs[name].float() - ref.float()).abs().max().item() <= 2e-2
    # The two experts have different random weights: a proxy that ignored its name would give equal outputs.
    assert not torch.allclose(outs["transformer"], outs["transformer_2"])
    stats = parallel.group.last_stats
    assert set(stats) == {0, 1} and all(s.get("pss_bytes", 0) > 0 for s in stats.values())
    # One copy of the streamed blocks on the host: rank 0 wrote the shared buffers, rank 1 only mapped them,
    # and their names are gone from /dev/shm once both had mapped them.
    assert stats[0]["shared_host_bytes"] == stats[1]["shared_host_bytes"] > 0
    assert stats[0]["written_host_bytes"] == stats[0]["shared_host_bytes"] and stats[1]["written_host_bytes"] == 0
    assert not glob.glob(f"/dev/shm/vramwise-{parallel.group.spec.share_token}-*")
    parallel.release()  # end of run: the streamed ranks give their slots back and keep serving
    again = parallel.proxies["transformer"](**inputs, return_dict=False)[0]
    assert torch.equal(again, outs["transformer"])
