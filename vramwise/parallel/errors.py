"""Errors of the parallel engine: a worker process that died or failed, and a run cancelled inside the workers."""

from __future__ import annotations

import signal

from ..errors import VramwiseError


def describe_exit(exitcode: int | None) -> str:
    """``exit code -9 (killed by SIGKILL)`` style text for a worker's ``Process.exitcode``."""
    if exitcode is None:
        return "no exit code (still running)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"exit code {exitcode} (killed by {name})"
    return f"exit code {exitcode}"


class ParallelWorkerError(VramwiseError):
    """A worker died or raised; the group was stopped and starts again on the next call."""

    def __init__(self, rank: int, device: str, what: str, fix: str, exitcode: int | None = None) -> None:
        self.rank = rank
        self.exitcode = exitcode
        super().__init__(
            f"Parallel denoiser worker rank {rank} ({device}) {what}. The other workers were stopped; the next run "
            f"starts them again. Fix: {fix}"
        )


class ParallelCancelled(Exception):
    """The workers stopped a call between two blocks because a cancel was requested."""
