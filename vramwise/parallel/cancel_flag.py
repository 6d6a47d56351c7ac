"""A one-byte cancel flag shared by the parent and its workers through a memory-mapped file.

The workers are plain subprocesses (see group.py), so a multiprocessing ``Event`` cannot be handed to them; a
``multiprocessing.shared_memory`` block opened by a non-multiprocessing child registers with (and starts) its own
resource tracker, which unlinks the block when the worker exits (Python < 3.13). A mapped file in /dev/shm has
neither problem and reads in nanoseconds, so it can be checked before every block.
"""

from __future__ import annotations

import mmap
import os
import tempfile


class CancelFlag:
    """Owner side (``create``) or worker side (``open``); ``set``/``clear``/``is_set`` like an Event."""

    def __init__(self, path: str, owner: bool) -> None:
        self.path = path
        self._owner = owner
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 1)
        finally:
            os.close(fd)

    @classmethod
    def create(cls) -> "CancelFlag":
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="vramwise-cancel-", dir=folder)
        os.write(fd, b"\0")
        os.close(fd)
        return cls(path, owner=True)

    @classmethod
    def open(cls, path: str) -> "CancelFlag":
        return cls(path, owner=False)

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    def is_set(self) -> bool:
        return self._map[0] != 0

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        if self._owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
