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
    """A worker died or raised; unless every rank raised alike, the group was stopped (it restarts on the next call)."""

    STOPPED = "The other workers were stopped; the next run starts them again."
    KEPT = "Every rank failed the same way before waiting on the others, so the workers stay loaded."

    def __init__(self, rank: int, device: str, what: str, fix: str, exitcode: int | None = None,
                 group_stopped: bool = True) -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.group_stopped = group_stopped
        after = self.STOPPED if group_stopped else self.KEPT
        super().__init__(f"Parallel denoiser worker rank {rank} ({device}) {what}. {after} Fix: {fix}")


class ParallelCancelled(Exception):
    """The workers stopped a call between two blocks because a cancel was requested."""
