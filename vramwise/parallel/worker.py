"""One rank of a worker group: its own process, its own copy of the denoiser(s), one GPU (or the CPU).

Started by group.py as a fresh interpreter that imports this package as top-level ``vramwise`` (never ComfyUI).
It joins the process group through the parent's TCPStore, loads each denoiser from the model folder's
safetensors (memory-mapped, so N ranks on one host share the page cache while they read), enables diffusers'
context parallelism, then answers calls until told to stop or its connection closes (the parent died).
Between blocks the ranks agree, by a MAX all-reduce of the cancel flag, whether to stop: a rank that stopped
alone would leave the others waiting forever in the next all-to-all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch

from . import protocol as p
from .cancel_flag import CancelFlag
from .spec import WorkerSpec


_ENGINES: list[Any] = []  # this process's shared-host stream engines, for _stats


class _Stop(Exception):
    def __init__(self, block: int) -> None:
        self.block = block


def load_denoiser(spec: WorkerSpec, name: str, device: torch.device) -> torch.nn.Module:
    """``<folder>/<name>`` through diffusers' own ``from_pretrained`` (class from its config.json)."""
    import diffusers

    folder = os.path.join(spec.folder, name)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cls = getattr(diffusers, json.load(f)["_class_name"])
    model = cls.from_pretrained(folder, torch_dtype=getattr(torch, spec.dtype), use_safetensors=True).eval()
    return model.to(device) if spec.placement == "resident" else model


def _place(model: torch.nn.Module, spec: WorkerSpec, device: torch.device, rank: int, name: str) -> Any:
    """Streamed placement: the stream engine on this rank's GPU, its block buffers shared by all ranks."""
    if spec.placement != "stream":
        return None
    from ..offload.stream import StreamSettings
    from .shared_host import SharedHostStream

    # Stock block forward (lean=False): the lean forward swaps the attention processors that carry the
    # context-parallel config. No compile: the per-block cancel all-reduce would be traced into the graphs.
    settings = StreamSettings(lean=False, ffn_chunk_tokens=8192, compile_blocks=False)
    return SharedHostStream(model, device, settings, token=f"{spec.share_token}-{name}", rank=rank)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []


def _install_cancel_checks(model: torch.nn.Module, flag: CancelFlag, device: torch.device, spec_world: int) -> None:
    agreed = torch.zeros(1, dtype=torch.int32, device=device)

    def make(index: int):
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            if spec_world == 1:
                if flag.is_set():
                    raise _Stop(index)
                return
            agreed.fill_(1 if flag.is_set() else 0)
            # One 4-byte collective per block: 40 per forward of a 14B Wan, against ~100 ms of compute per block.
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            if int(agreed.item()):
                raise _Stop(index)

        return pre_hook

    # The hooks live as long as this process's private model; nothing outside the worker sees them.
    for i, block in enumerate(_blocks(model)):
        block.register_forward_pre_hook(make(i))


def _enable_parallelism(model: torch.nn.Module, spec: WorkerSpec) -> None:
    from diffusers import ContextParallelConfig

    from .device_count import at_least_one_device

    if spec.attention_backend:
        model.set_attention_backend(spec.attention_backend)
    if spec.world_size == 1:
        return  # one rank (benchmark baseline): diffusers refuses a context-parallel degree of 1
    config = ContextParallelConfig(
        ulysses_degree=spec.ulysses_degree if spec.ulysses_degree > 1 else None,
        ring_degree=spec.ring_degree if spec.ring_degree > 1 else None,
    )
    with at_least_one_device():
        model.enable_parallelism(config=config)


def _forward(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(kwargs, return_dict=False)
    with torch.no_grad():
        out = model(**kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _stats(device: torch.device) -> dict[str, int]:
    """This rank's peak GPU bytes during the call and its host memory (PSS: shared mmapped pages counted once)."""
    stats = {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0}
    for engine in _ENGINES:
        stats["shared_host_bytes"] = stats.get("shared_host_bytes", 0) + engine.shared_bytes
        stats["written_host_bytes"] = stats.get("written_host_bytes", 0) + engine.written_bytes
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("Rss", "Pss"):
                    stats[key.lower() + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return stats


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone, even from inside a collective that will never complete (no orphans)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def serve(rank: int, spec: WorkerSpec, store_port: int, conn: Any, flag: CancelFlag) -> None:
    """Join the group, load, report ready, then answer calls until shutdown."""
    import torch.distributed as dist

    from ..device import is_oom

    def send_failure(call_id: int | None, e: BaseException) -> None:
        try:
            conn.send(p.failed(call_id, rank, type(e).__name__, str(e), traceback.format_exc(), is_oom(e)))
        except (OSError, EOFError):
            pass

    device = torch.device(spec.device_of(rank))
    try:
        if spec.device_type == "cuda":
            torch.cuda.set_device(device)
        elif spec.threads:
            torch.set_num_threads(spec.threads)
        timeout = timedelta(seconds=spec.collective_timeout_s)
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size, timeout=timeout)
        models: dict[str, torch.nn.Module] = {}
        engines: dict[str, Any] = {}  # kept alive with the models
        for name in spec.denoisers:
            streamed = spec.placement == "stream"
            # Streamed ranks load one after the other (rank 0 fills the shared block buffers, the others map
            # them): each holds a private copy of the weights only until its blocks point into the shared
            # buffers, so host RAM peaks at one shared + one private copy instead of N.
            for turn in range(spec.world_size if streamed else 1):
                if not streamed or turn == rank:
                    model = load_denoiser(spec, name, device)
                    _enable_parallelism(model, spec)
                    _install_cancel_checks(model, flag, device, spec.world_size)
                    engines[name] = _place(model, spec, device, rank, name)
                if streamed and spec.world_size > 1:
                    dist.barrier()
            if streamed:
                _ENGINES.append(engines[name])
                if rank == 0:
                    engines[name].unlink()  # every rank has mapped them (the last barrier)
            models[name] = model
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = spec.attention_backend or _AttentionBackendRegistry.get_active_backend()[0].value
        conn.send(p.ready(rank, str(device), backend))
    except BaseException as e:  # noqa: BLE001 - every start failure is reported to the parent
        send_failure(None, e)
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if msg.get("kind") == p.SHUTDOWN:
                return
            if msg.get("kind") == p.RELEASE:
                # End of a run: streamed ranks give their GPU slots and resident parts back, as in one process.
                for engine in engines.values():
                    if engine is not None:
                        engine.release()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if msg.get("kind") != p.CALL:
                continue
            call_id = msg["call_id"]
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                out = _forward(models[msg["denoiser"]], p.unpack(msg["kwargs"], device))
                conn.send(p.result(call_id, rank, out if rank == 0 else None, _stats(device)))
            except _Stop as stop:
                conn.send(p.cancelled(call_id, rank, stop.block))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the group
                send_failure(call_id, e)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group is being thrown away anyway
            pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -c '...; main()' --rank R --spec JSON --store-port P --address H:P --flag PATH``."""
    from multiprocessing.connection import Client

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--flag", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    # The parent's authkey arrives on stdin, never on the command line (which other users can read).
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    host, port = args.address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=authkey)
    conn.send({"kind": "hello", "rank": args.rank})
    flag = CancelFlag.open(args.flag)
    try:
        serve(args.rank, WorkerSpec.from_json(args.spec), args.store_port, conn, flag)
    finally:
        flag.close()
        conn.close()
