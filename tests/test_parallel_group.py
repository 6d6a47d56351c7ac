"""Two CPU processes with gloo running the tiny Wan2.1 I2V denoiser through diffusers' context parallelism
(Ulysses degree 2), against the same model in one process; cancel, a killed worker, shutdown.

One worker group serves the whole module (starting two interpreters that import diffusers takes ~20 s on the
shared 2-core test machine); the tests run in file order and the last one shuts it down.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import psutil
import pytest
import torch

from vramwise.loader import LoadOptions, load_pipeline
from vramwise.handles import VramwiseModel
from vramwise.offload import OffloadMode
from vramwise.parallel import ParallelCancelled, ParallelWorkerError, cancel_checks, launch_parallel
from vramwise.precision import WeightDtype
from vramwise.sampling import generate

from engine_helpers import Cancelled, Recorder
from engine_helpers import tiny_wan_request as _request

CPU = torch.device("cpu")
# bf16 weights and activations on both sides. Ulysses moves whole heads between ranks and every rank computes
# its token rows with the same kernels, so on this CPU the outputs were bit-identical (max |diff| 0.0); the
# tolerance leaves room for a BLAS that blocks a matmul differently when it has half the rows.
ATOL = 2e-2


@pytest.fixture(scope="module")
def folder(tiny_models_root):
    return tiny_models_root / "tiny-wan21-i2v"


@pytest.fixture(scope="module")
def parallel(folder):
    from vramwise.families import detect_family

    par = launch_parallel(folder, detect_family(folder), 2, torch.bfloat16, CPU, device_type="cpu")
    yield par
    par.shutdown()


@pytest.fixture(scope="module")
def single(folder):
    """The same denoiser in this process, for reference outputs."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16).eval()


def _inputs(seed: int = 0, frames: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 36, frames, 8, 8, generator=g).bfloat16(),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, 32, generator=g).bfloat16(),
        encoder_hidden_states_image=torch.randn(1, 17, 16, generator=g).bfloat16(),
    )


def _reference(single, inputs):
    with torch.no_grad():
        return single(**inputs, return_dict=False)[0]


def _run(model, parallel, request, observer=None):
    """One sampling run with the proxies installed and the observer's cancel check reaching the workers."""
    pipe = model.loaded.pipe
    original = {n: getattr(pipe, n) for n in parallel.proxies}
    parallel.install(pipe)
    observer = observer or Recorder()
    try:
        with cancel_checks(model.loaded.denoisers, observer.check_cancel):
            return generate(model, request, observer)
    finally:
        for name, module in original.items():
            setattr(pipe, name, module)


@pytest.fixture(scope="module")
def wan(folder):
    return VramwiseModel(load_pipeline(LoadOptions(folder, OffloadMode.NONE, WeightDtype.BF16), CPU))


def _worker_processes() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("vramwise.parallel.worker" in part for part in child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_two_ranks_give_the_same_forward_as_one_process(parallel, single):
    assert parallel.group.attention_backend == "native"
    for seed, frames in ((0, 2), (1, 4)):
        inputs = _inputs(seed, frames)
        out = parallel.proxies["transformer"](**inputs, return_dict=False)[0]
        ref = _reference(single, inputs)
        assert out.shape == ref.shape == (1, 16, frames, 8, 8) and out.dtype == ref.dtype
        assert (out.float() - ref.float()).abs().max().item() <= ATOL


def test_sampling_through_the_proxy_matches_one_process(parallel, wan):
    ref = generate(wan, _request(steps=3))
    rec = Recorder()
    got = _run(wan, parallel, _request(steps=3), rec)
    assert rec.steps == [(1, 3), (2, 3), (3, 3)]
    assert torch.allclose(got.samples, ref.samples, atol=ATOL, rtol=0)
    assert wan.loaded.pipe.transformer is not parallel.proxies["transformer"]  # restored


def test_a_pipeline_loaded_without_its_denoiser_samples_like_one_process(parallel, wan, folder):
    from vramwise.handles import LoadedPipeline
    from vramwise.parallel.pipeline import attach, load_without_denoisers

    family = wan.loaded.family
    pipe = load_without_denoisers(family, folder, torch.bfloat16)
    assert pipe.transformer is None  # the parent never loaded the denoiser's weights
    attach(pipe, parallel)
    assert pipe.transformer is parallel.proxies["transformer"]
    model = VramwiseModel(LoadedPipeline(pipe=pipe, family=family, options=wan.loaded.options, device=CPU))
    rec = Recorder()
    with cancel_checks(model.loaded.denoisers, rec.check_cancel):
        got = generate(model, _request(steps=2), rec)
    ref = generate(wan, _request(steps=2))
    assert torch.allclose(got.samples, ref.samples, atol=ATOL, rtol=0)


def test_a_cancel_stops_the_workers_before_a_block_and_they_stay_usable(parallel, single):
    pids = parallel.group.pids
    parallel.group.request_cancel()  # set before the call: every rank stops before block 0
    with pytest.raises(ParallelCancelled):
        parallel.proxies["transformer"](**_inputs(), return_dict=False)
    assert parallel.group.pids == pids and parallel.group.alive
    out = parallel.proxies["transformer"](**_inputs(), return_dict=False)[0]
    assert (out.float() - _reference(single, _inputs()).float()).abs().max().item() <= ATOL


def test_an_error_every_rank_raises_alike_keeps_the_workers_loaded(parallel, single):
    pids = parallel.group.pids
    bad = dict(_inputs(), hidden_states=torch.randn(1, 20, 2, 8, 8).bfloat16())  # 20 channels, the model has 36
    with pytest.raises(ParallelWorkerError) as e:
        parallel.proxies["transformer"](**bad, return_dict=False)
    assert "raised RuntimeError" in str(e.value) and "stay loaded" in str(e.value) and not e.value.group_stopped
    assert parallel.group.pids == pids and parallel.group.alive
    out = parallel.proxies["transformer"](**_inputs(), return_dict=False)[0]
    assert (out.float() - _reference(single, _inputs()).float()).abs().max().item() <= ATOL


class _CancelWhileWaiting(Recorder):
    """Raises the host's interrupt from the cancel check that runs while the workers compute."""

    def __init__(self, after_checks: int) -> None:
        super().__init__()
        self.after_checks = after_checks

    def check_cancel(self) -> None:
        super().check_cancel()
        if self.checks > self.after_checks:
            raise Cancelled("interrupted")


def test_cancel_during_sampling_raises_the_hosts_interrupt_and_the_next_run_matches(parallel, wan):
    pids = parallel.group.pids
    with pytest.raises(Cancelled):
        _run(wan, parallel, _request(steps=3), _CancelWhileWaiting(after_checks=3))
    assert parallel.group.pids == pids and parallel.group.alive
    ref = generate(wan, _request(steps=2))
    got = _run(wan, parallel, _request(steps=2))
    assert torch.allclose(got.samples, ref.samples, atol=ATOL, rtol=0)


class _KillRank1(Recorder):
    """SIGKILLs rank 1 from inside a transformer call (the proxy's wait loop runs the cancel check)."""

    def __init__(self, group) -> None:
        super().__init__()
        self.group = group
        self.killed = False

    def check_cancel(self) -> None:
        super().check_cancel()
        if not self.killed and self.steps:  # one step done: the run is well under way
            os.kill(self.group.pids[1], signal.SIGKILL)
            self.killed = True


def test_a_worker_killed_mid_run_is_a_clear_error_and_the_next_run_works(parallel, wan):
    group = parallel.group
    starts = group.starts
    with pytest.raises(ParallelWorkerError) as e:
        _run(wan, parallel, _request(steps=4), _KillRank1(group))
    message = str(e.value)
    assert "rank 1" in message and "exit code -9 (killed by SIGKILL)" in message and "Fix:" in message
    assert e.value.rank == 1 and e.value.exitcode == -9 and e.value.group_stopped
    # The surviving rank was stopped too: nothing is left waiting in a collective.
    assert not group.alive and _worker_processes() == []
    ref = generate(wan, _request(steps=2))
    got = _run(wan, parallel, _request(steps=2))
    assert group.starts == starts + 1
    assert torch.allclose(got.samples, ref.samples, atol=ATOL, rtol=0)


def test_shutdown_leaves_no_child_process(parallel):
    assert parallel.group.alive and len(_worker_processes()) == 2
    pids = parallel.group.pids
    parallel.shutdown()
    assert not parallel.group.alive and parallel.group.pids == []
    assert _worker_processes() == [] and multiprocessing.active_children() == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    parallel.shutdown()  # idempotent
