"""The one call a loader makes for ``gpus`` > 1: validate, start the workers, hand back the proxies.

Usage (loader): build the pipeline with the denoisers left out (``Pipeline.from_pretrained(folder,
transformer=None, transformer_2=None, ...)``: the parent never reads the 14B weights), then

    parallel = launch_parallel(folder, family, gpus, torch_dtype, device)
    parallel.install(pipe)        # pipe.transformer (and transformer_2) become ParallelDenoiser proxies
    ...
    parallel.shutdown()           # on unload / release; the processes are gone when it returns
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .attention import resolve_backend
from .group import WorkerGroup
from .placement import choose_placement, denoiser_bytes
from .proxy import ParallelDenoiser
from .spec import WorkerSpec
from .support import check_device_count, check_family, check_heads


@dataclass
class ParallelDenoisers:
    """A started worker group and one proxy per denoiser."""

    group: WorkerGroup
    proxies: dict[str, ParallelDenoiser] = field(default_factory=dict)

    def install(self, pipe: Any) -> None:
        for name, proxy in self.proxies.items():
            setattr(pipe, name, proxy)

    def describe(self) -> str:
        spec = self.group.spec
        kind = "Ulysses" if spec.ring_degree == 1 else f"ring {spec.ring_degree} x Ulysses {spec.ulysses_degree}"
        return (f"denoiser on {spec.world_size} {'GPUs' if spec.device_type == 'cuda' else 'CPU processes'}, "
                f"{spec.placement} on each ({kind} sequence parallel, {spec.backend}, attention backend "
                f"{self.group.attention_backend or spec.attention_backend or 'native'})")

    def release(self) -> None:
        """After every run (the loader's release_hooks): streamed ranks give their GPU slots back."""
        self.group.release()

    def shutdown(self) -> None:
        self.group.shutdown()


def _config(folder: Path, name: str) -> dict[str, Any]:
    from diffusers.configuration_utils import FrozenDict

    with open(folder / name / "config.json", encoding="utf-8") as f:
        return FrozenDict(json.load(f))


def launch_parallel(folder: Path | str, family: Any, gpus: int, torch_dtype: torch.dtype, device: torch.device,
                    *, placement: str = "auto", attention_backend: str | None = None, ring_degree: int = 1,
                    start: bool = True, device_type: str | None = None,
                    activation_bytes_per_gpu: int = 0) -> ParallelDenoisers:
    """Check that ``family`` at ``gpus`` can run split, start ``gpus`` workers, return the proxies.

    ``device`` is where the pipeline (latents, VAE) lives and where outputs are returned. ``device_type``
    "cuda" runs rank r on cuda:r with NCCL (the default when CUDA is present), "cpu" runs gloo (tests, bench).
    ``placement`` "resident" (each GPU holds the whole denoiser), "stream" (each rank streams its blocks, one
    shared host copy), or "auto": resident when every GPU's free memory holds the weights plus
    ``activation_bytes_per_gpu`` (the planner's estimate for 1/N of the tokens) and headroom, else stream.
    """
    if placement not in ("auto", "resident", "stream"):
        raise InputError("offload_mode", f"'{placement}' cannot run on several GPUs.",
                         "use auto, none (resident on every GPU) or stream.")
    folder = Path(folder)
    check_family(family, gpus)
    names = tuple(n for n in family.denoiser_names if (folder / n / "config.json").is_file())
    configs = {n: _config(folder, n) for n in names}
    for config in configs.values():
        check_heads(config, gpus // ring_degree)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        check_device_count(gpus, torch.cuda.device_count())
    resolve_backend(attention_backend, ring_degree)  # refuses a backend that cannot split attention
    if placement == "auto":
        if device_type == "cuda":
            weights = denoiser_bytes(folder, names, torch.tensor([], dtype=torch_dtype).element_size())
            free = [torch.cuda.mem_get_info(i)[0] for i in range(gpus)]
            placement = choose_placement(weights, free, activation_bytes_per_gpu)
        else:
            placement = "resident"
    threads = max(1, (os.cpu_count() or 1) // gpus) if device_type == "cpu" else None
    spec = WorkerSpec(folder=str(folder), denoisers=names, world_size=gpus, device_type=device_type,
                      dtype=str(torch_dtype).removeprefix("torch."), attention_backend=attention_backend or None,
                      ring_degree=ring_degree, threads=threads, placement=placement,
                      share_token=f"{os.getpid()}-{secrets.token_hex(4)}")
    group = WorkerGroup(spec)
    if start:
        group.start()
    proxies = {n: ParallelDenoiser(group, n, configs[n], torch_dtype, device) for n in names}
    return ParallelDenoisers(group, proxies)
