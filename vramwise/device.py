"""Device memory: how much is free, and giving back what a run no longer needs."""

from __future__ import annotations

import gc

import torch


def trim_host_heap() -> None:
    """Hand freed host heap back to the OS (glibc ``malloc_trim``).

    Tensors under glibc's mmap threshold (dynamic, up to 32 MiB: norms, biases, small models' weights, the
    per-run latents) live on the heap, and freeing them does not shrink the process: without this, RSS stays at
    its high-water mark after loading, converting or a run (measured in tests/test_host_memory.py).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        pass


def release_memory(device: torch.device | None = None) -> None:
    """Drop unreachable tensors and return cached allocator blocks so other programs (and ComfyUI) can use them."""
    gc.collect()
    trim_host_heap()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel could hand out without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can still get, counting the allocator's reusable cache."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + reserved_unused)
    return host_available_bytes()


def allocated_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return 0


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or other accelerator) out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
