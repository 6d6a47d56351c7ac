"""A group of N worker processes that run one denoiser together (context parallelism), owned by the pack.

Why plain subprocesses and not ``torch.multiprocessing`` spawn: spawn re-runs the parent's ``__main__`` file in
every child (as ``__mp_main__``, with the parent's argv), and inside ComfyUI that is ``main.py``: its module-level
code runs every custom node's prestartup script, sets up paths and logging and imports ComfyUI, in each worker.
A fresh ``python -c`` that imports only this package avoids all of it. The processes still talk through ``multiprocessing.connection`` (authenticated sockets
on 127.0.0.1), rendezvous through a TCPStore the parent holds on a port the OS picks (no free-port race), and
share a memory-mapped cancel flag.

Lifecycle: ``start`` (lazy: ``call`` starts a stopped group) -> ``call``... -> ``shutdown`` (join with a timeout,
then terminate, then kill). A worker that dies or raises stops the whole group (its peers would otherwise wait
in a collective forever) and surfaces as ``ParallelWorkerError`` naming the rank and exit code; the next call
starts a fresh group.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any, Callable

import torch

from . import protocol as p
from .cancel_flag import CancelFlag
from .errors import ParallelCancelled, ParallelWorkerError, describe_exit
from .spec import WorkerSpec

log = logging.getLogger(__name__)

# The folder that holds the ``vramwise`` package: workers import it as top-level ``vramwise`` from here.
_PACK_ROOT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from vramwise.parallel.worker import main; main(sys.argv[2:])"

_SIGKILL_FIX = (
    "a worker killed with SIGKILL was usually stopped by the kernel for lack of host RAM: lower width, height or "
    "num_frames, use fewer GPUs, or close other programs. Otherwise see the worker's output in the ComfyUI console."
)
_GENERIC_FIX = "see the worker's output in the ComfyUI console; if it repeats, set gpus to 1."


class _State:
    """Everything a running group holds; shut down by ``_stop`` (also from the finaliser at exit)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.conns: dict[int, Connection] = {}
        self.listener: Listener | None = None
        self.store: Any = None
        self.flag: CancelFlag | None = None
        self.devices: dict[int, str] = {}
        self.attention_backend: str | None = None


def _remove_shared_files(token: str) -> None:
    """Shared block buffers a rank created but did not get to unlink (it died while the group was starting)."""
    import glob

    if token:
        for path in glob.glob(f"/dev/shm/vramwise-{glob.escape(token)}-*"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _stop(state: _State, timeout_s: float, share_token: str = "") -> None:
    for conn in state.conns.values():
        try:
            conn.send(p.shutdown())
        except (OSError, EOFError, ValueError):
            pass
    deadline = time.monotonic() + timeout_s
    for proc in state.procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in state.procs:
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for conn in state.conns.values():
        conn.close()
    if state.listener is not None:
        state.listener.close()
    if state.flag is not None:
        state.flag.close()
    state.procs, state.conns, state.listener, state.store, state.flag = [], {}, None, None, None
    _remove_shared_files(share_token)


class WorkerGroup:
    """N ranks running ``spec``'s denoisers; one call at a time."""

    def __init__(self, spec: WorkerSpec, *, poll_s: float = 0.05, cancel_timeout_s: float = 120.0,
                 stop_timeout_s: float = 10.0, failure_grace_s: float = 2.0) -> None:
        self.spec = spec
        self.poll_s = poll_s
        self.cancel_timeout_s = cancel_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.failure_grace_s = failure_grace_s
        self._state = _State()
        self._lock = threading.RLock()
        self._call_id = 0
        self.starts = 0  # how many times processes were started (a restart after a failure counts)
        # Per rank, from the last call that finished: peak_gpu_bytes, rss_bytes, pss_bytes (worker.py _stats).
        self.last_stats: dict[int, dict[str, int]] = {}
        self._finalizer = weakref.finalize(self, _stop, self._state, stop_timeout_s, spec.share_token)

    # ----- lifecycle -----
    @property
    def alive(self) -> bool:
        return bool(self._state.procs) and all(proc.poll() is None for proc in self._state.procs)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._state.procs]

    @property
    def attention_backend(self) -> str | None:
        return self._state.attention_backend

    def start(self) -> None:
        """Start the N processes and wait until every rank has loaded its denoisers."""
        with self._lock:
            if self.alive:
                return
            self._shutdown_locked()
            try:
                self._start_locked()
            except BaseException:
                self._shutdown_locked()
                raise
            self.starts += 1

    def _start_locked(self) -> None:
        import torch.distributed as dist

        spec, st = self.spec, self._state
        authkey = os.urandom(32)
        st.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        st.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        st.flag = CancelFlag.create()
        host, port = st.listener.address
        for rank in range(spec.world_size):
            args = [sys.executable, "-c", _BOOTSTRAP, _PACK_ROOT, "--rank", str(rank), "--spec", spec.to_json(),
                    "--store-port", str(st.store.port), "--address", f"{host}:{port}", "--flag", st.flag.path,
                    "--parent-pid", str(os.getpid())]
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, text=True)
            proc.stdin.write(authkey.hex() + "\n")
            proc.stdin.close()
            st.procs.append(proc)
            st.devices[rank] = spec.device_of(rank)
        self._accept_all()
        pending = set(range(spec.world_size))
        while pending:
            for rank, msg in self._receive(pending, what="while loading the denoiser"):
                if msg["kind"] == p.FAILED:
                    self._raise_failure(msg, "while loading the denoiser")
                if msg["kind"] == p.READY:
                    st.attention_backend = msg["attention_backend"]
                    pending.discard(rank)

    def _accept_all(self) -> None:
        """Accept one connection per rank; a rank that dies before connecting is reported, not waited for."""
        st, n = self._state, self.spec.world_size
        accepted: list[Connection] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                while len(accepted) < n:
                    accepted.append(st.listener.accept())
            except BaseException as e:  # noqa: BLE001 - the listener was closed because a worker died
                errors.append(e)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.poll_s)
            self._check_deaths("while starting")
        if len(accepted) < n:
            raise RuntimeError(f"parallel workers did not connect: {errors[:1]}")
        for conn in accepted:
            hello = conn.recv()
            st.conns[int(hello["rank"])] = conn

    def shutdown(self) -> None:
        """Stop every worker (join with a timeout, then terminate); the group can be started again."""
        with self._lock:
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        _stop(self._state, self.stop_timeout_s, self.spec.share_token)

    def release(self) -> None:
        """End of a run: streamed ranks free their GPU slots (resident ranks keep their weights)."""
        with self._lock:
            for conn in self._state.conns.values():
                try:
                    conn.send(p.release())
                except (OSError, EOFError):
                    pass  # a dead worker is reported by the next call

    # ----- calls -----
    def request_cancel(self) -> None:
        """Ask the running call to stop before its next block (safe from any thread)."""
        flag = self._state.flag
        if flag is not None:
            flag.set()

    def call(self, denoiser: str, kwargs: dict[str, Any], cancel_check: Callable[[], None] | None = None
             ) -> torch.Tensor:
        """Run ``denoiser(**kwargs)`` on every rank; rank 0's gathered output, on the CPU.

        ``cancel_check`` is called while waiting; when it raises, the workers stop before their next block and
        its exception propagates (so ComfyUI's interrupt keeps its own type). ``request_cancel`` from elsewhere
        gives ``ParallelCancelled``.
        """
        with self._lock:
            self.start()
            self._call_id += 1
            call_id = self._call_id
            message = p.call(call_id, denoiser, kwargs)
            for rank, conn in self._state.conns.items():
                try:
                    conn.send(message)
                except (OSError, EOFError):
                    self._check_deaths("while receiving a call", wait_s=self.failure_grace_s)
                    raise
            return self._collect(call_id, cancel_check)

    def _collect(self, call_id: int, cancel_check: Callable[[], None] | None) -> torch.Tensor:
        pending = set(self._state.conns)
        output = None
        cancelled = False
        while pending:
            for rank, msg in self._receive(pending, what="while running the denoiser", cancel_check=cancel_check,
                                           call_id=call_id):
                kind = msg["kind"]
                if kind == p.FAILED:
                    self._raise_failure(msg, "while running the denoiser", pending - {rank}, call_id)
                if kind == p.RESULT:
                    output = p.unpack(msg["output"]) if msg["output"] is not None else output
                    self.last_stats[rank] = dict(msg.get("stats") or {})
                cancelled = cancelled or kind == p.CANCELLED
                pending.discard(rank)
        if cancelled:
            self._state.flag.clear()
            raise ParallelCancelled(f"the parallel denoiser stopped call {call_id} on request")
        return output

    def _receive(self, pending: set[int], what: str, cancel_check: Callable[[], None] | None = None,
                 call_id: int | None = None):
        """Yield (rank, message) from the ranks in ``pending``; raise on a death, run the cancel check."""
        conns = {self._state.conns[r]: r for r in pending if r in self._state.conns}
        while True:
            if cancel_check is not None:
                try:
                    cancel_check()
                except BaseException:
                    self._cancel_and_drain(pending, call_id)
                    raise
            ready = wait(list(conns), timeout=self.poll_s) if conns else (time.sleep(self.poll_s) or [])
            got = []
            for conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._check_deaths(what, wait_s=self.stop_timeout_s)
                    raise
                if call_id is not None and msg.get("call_id") not in (call_id, None):
                    continue  # a late reply to an earlier call
                got.append((conns[conn], msg))
            if got:
                yield from got
                return
            # Messages first: a rank that reported an error and then exited is reported by its error.
            self._check_deaths(what)

    def _cancel_and_drain(self, pending: set[int], call_id: int | None) -> None:
        """Set the flag, wait for every rank to stop (or finish) the call, clear the flag."""
        st = self._state
        if st.flag is None:
            return
        st.flag.set()
        left = set(pending)
        deadline = time.monotonic() + self.cancel_timeout_s
        try:
            while left and time.monotonic() < deadline:
                if any(proc.poll() is not None for proc in st.procs):
                    break
                conns = {st.conns[r]: r for r in left}
                for conn in wait(list(conns), timeout=self.poll_s):
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        continue
                    if msg.get("call_id") == call_id:
                        left.discard(conns[conn])
                        if msg["kind"] == p.FAILED:
                            left = {-1}  # a failure: the group is not reusable
                            break
        finally:
            if left:
                log.warning("parallel workers did not stop cleanly after a cancel; stopping the group")
                self._shutdown_locked()
            elif st.flag is not None:
                st.flag.clear()

    # ----- failures -----
    def _check_deaths(self, what: str, wait_s: float = 0.0, crashes_only: bool = False) -> None:
        """Raise ParallelWorkerError for the first rank that exited (``crashes_only``: with a non-zero code)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, proc.poll()) for r, proc in enumerate(self._state.procs)
                    if proc.poll() is not None and not (crashes_only and proc.poll() == 0)]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        if not dead:
            return
        rank, code = dead[0]
        device = self._state.devices.get(rank, "?")
        self._shutdown_locked()
        fix = _SIGKILL_FIX if code == -9 else _GENERIC_FIX
        raise ParallelWorkerError(rank, device, f"exited with {describe_exit(code)} {what}", fix, exitcode=code)

    def _others_failed_too(self, others: set[int], call_id: int | None) -> bool:
        """True when every other rank also reports a failure of this call within the grace period: then no rank
        waits in a collective (they all failed before or at the same one) and the group stays usable."""
        left = set(others)
        deadline = time.monotonic() + self.failure_grace_s
        while left and time.monotonic() < deadline:
            conns = {self._state.conns[r]: r for r in left}
            for conn in wait(list(conns), timeout=self.poll_s):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return False
                if msg.get("call_id") != call_id:
                    continue
                if msg["kind"] != p.FAILED:
                    return False
                left.discard(conns[conn])
        return not left

    def _raise_failure(self, msg: dict[str, Any], what: str, others: set[int] = frozenset(),
                       call_id: int | None = None) -> None:
        rank = int(msg["rank"])
        device = self._state.devices.get(rank, "?")
        log.error("parallel worker rank %d failed %s:\n%s", rank, what, msg["traceback"])
        keep = call_id is not None and self._others_failed_too(others, call_id) and not msg["oom"]
        # A peer that died is the cause, the others' errors (broken collectives) the symptom: report the death.
        # Ranks that reported an error exit cleanly (code 0) when they fail while starting; only crashes count.
        self._check_deaths(what, wait_s=0.0 if keep else self.failure_grace_s, crashes_only=True)
        if not keep:
            self._shutdown_locked()
        if msg["oom"]:
            raise torch.OutOfMemoryError(
                f"Parallel denoiser worker rank {rank} ({device}) ran out of memory {what}: {msg['message']}"
            )
        fix = _GENERIC_FIX if call_id is not None else (
            f"check that the denoiser folders ({', '.join(self.spec.denoisers)}) in '{self.spec.folder}' are "
            "complete (config.json and *.safetensors; copy or download them again), or set gpus to 1."
        )
        raise ParallelWorkerError(rank, device, f"raised {msg['error']}: {msg['message']} {what}", fix,
                                  group_stopped=not keep)
