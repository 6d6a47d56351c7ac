"""Several GPUs for one denoiser: worker processes with diffusers' context parallelism (Ulysses / ring).

``launch.launch_parallel`` is what a loader calls (with ``pipeline.load_without_denoisers`` for the rest); ``group.WorkerGroup`` owns the processes, ``worker`` is what
each rank runs, ``proxy.ParallelDenoiser`` stands in for the transformer inside the pipeline, ``support`` holds
the refusals (families without a plan, head counts, token counts), ``attention`` the backend rules.
"""

from .errors import ParallelCancelled, ParallelWorkerError
from .group import WorkerGroup
from .launch import ParallelDenoisers, launch_parallel
from .pipeline import attach, load_without_denoisers
from .proxy import ParallelDenoiser, cancel_checks
from .spec import WorkerSpec
from .support import check_family

__all__ = [
    "ParallelCancelled",
    "ParallelDenoiser",
    "ParallelDenoisers",
    "ParallelWorkerError",
    "WorkerGroup",
    "WorkerSpec",
    "attach",
    "cancel_checks",
    "check_family",
    "launch_parallel",
    "load_without_denoisers",
]
