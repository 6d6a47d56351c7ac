"""What the parent and the workers send each other over their connections.

Messages are plain dicts, tuples and bytes, never classes of this pack: inside ComfyUI the pack is imported as
``<pack folder>.vramwise`` while a worker imports it as top-level ``vramwise`` (see group.py), so a pickled class
of one would not load in the other.

Tensors travel by value (their bytes), not through torch.multiprocessing's shared-memory reductions: those hand
over a file descriptor that the receiver fetches from the sender later, which fails when the sender has exited
(a worker that dies right after replying). A transformer call moves ~20 MB (latents, text and image embeddings at
720x1280x81, bf16), a few ms of copying against seconds of compute. Everything goes through the CPU, so the
protocol does not care which GPU each side uses.
"""

from __future__ import annotations

from typing import Any

import torch

_TENSOR = "__tensor__"

# Message kinds. Parent -> worker: CALL, RELEASE (end of a run, no reply), SHUTDOWN.
# Worker -> parent: READY, RESULT, CANCELLED, FAILED.
CALL, RELEASE, SHUTDOWN = "call", "release", "shutdown"
READY, RESULT, CANCELLED, FAILED = "ready", "result", "cancelled", "failed"


def pack(value: Any) -> Any:
    """``value`` with every tensor (also inside lists, tuples and dicts) replaced by (marker, dtype, shape, bytes)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        # A fresh dense copy: ``contiguous()`` keeps zero strides of expanded tensors (the pipeline's timestep).
        flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
        data = flat.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return (_TENSOR, str(t.dtype).removeprefix("torch."), tuple(t.shape), data)
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(pack(v) for v in value)
    return value


def _is_packed(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 4 and value[0] == _TENSOR


def unpack(value: Any, device: torch.device | str = "cpu") -> Any:
    """The inverse of ``pack``, with the tensors placed on ``device``."""
    if _is_packed(value):
        _, dtype_name, shape, data = value
        dtype = getattr(torch, dtype_name)
        if not data:
            return torch.empty(shape, dtype=dtype, device=device)
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).to(device)
    if isinstance(value, dict):
        return {k: unpack(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unpack(v, device) for v in value)
    return value


def call(call_id: int, denoiser: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"kind": CALL, "call_id": call_id, "denoiser": denoiser, "kwargs": pack(kwargs)}


def release() -> dict[str, Any]:
    return {"kind": RELEASE}


def shutdown() -> dict[str, Any]:
    return {"kind": SHUTDOWN}


def ready(rank: int, device: str, attention_backend: str) -> dict[str, Any]:
    return {"kind": READY, "rank": rank, "device": device, "attention_backend": attention_backend}


def result(call_id: int, rank: int, output: torch.Tensor | None, stats: dict[str, int] | None = None
           ) -> dict[str, Any]:
    # Only rank 0 sends the output: after the gather at proj_out every rank holds the same full tensor.
    return {"kind": RESULT, "call_id": call_id, "rank": rank, "output": pack(output), "stats": stats or {}}


def cancelled(call_id: int, rank: int, block: int) -> dict[str, Any]:
    return {"kind": CANCELLED, "call_id": call_id, "rank": rank, "block": block}


def failed(call_id: int | None, rank: int, kind: str, message: str, tb: str, oom: bool) -> dict[str, Any]:
    return {"kind": FAILED, "call_id": call_id, "rank": rank, "error": kind, "message": message, "traceback": tb,
            "oom": oom}
