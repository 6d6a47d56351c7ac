"""What a worker group runs: which model folder, which denoisers, how many ranks, which attention backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker builds its denoiser(s) from; crosses to the worker as JSON (see protocol.py why)."""

    folder: str  # the diffusers model folder; each rank reads <folder>/<denoiser> (safetensors, memory-mapped)
    denoisers: tuple[str, ...] = ("transformer",)
    world_size: int = 2
    device_type: str = "cpu"  # "cuda": rank r runs on cuda:r with NCCL; "cpu": gloo
    dtype: str = "bfloat16"
    # None: diffusers' active backend (native SDPA unless the user changed it); see attention.resolve_backend.
    attention_backend: str | None = None
    ring_degree: int = 1  # Ulysses degree is world_size // ring_degree
    # CPU threads per worker (CPU runs only): the ranks share the host's cores instead of each taking all of them.
    threads: int | None = None
    # Seconds a collective may wait before the process group gives up (a peer that died leaves the rest waiting;
    # the parent stops them long before this).
    collective_timeout_s: float = 600.0
    # "resident": each rank holds the whole denoiser on its GPU. "stream": each rank streams the repeated blocks
    # from pinned host memory through the pack's stream engine, the block buffers shared by all ranks
    # (shared_host.py), so host RAM holds them once.
    placement: str = "resident"
    share_token: str = ""  # names the shared block buffers of this group in /dev/shm (launch.py sets it)

    @property
    def ulysses_degree(self) -> int:
        return self.world_size // self.ring_degree

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device_type == "cuda" else "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        data = json.loads(text)
        data["denoisers"] = tuple(data["denoisers"])
        return cls(**data)
