"""Reading this process's resident memory (VmRSS) and its peak (VmHWM) from /proc, for memory tests."""

from __future__ import annotations


def _status(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def rss(pid: int | str = "self") -> int:
    return _status("VmRSS", pid)


def peak_rss(pid: int | str = "self") -> int:
    return _status("VmHWM", pid)


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
