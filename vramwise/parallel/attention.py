"""Which attention backend the ranks run, and whether ring attention may use it.

Ulysses (all-to-all over heads) works with every backend diffusers marks ``supports_context_parallel``. Ring
attention merges partial results through their log-sum-exp, so the backend must return it (``return_lse``):
diffusers' native SDPA backend refuses (``ValueError`` in ``_native_attention``). The ``*_hub`` variants download
kernels at run time and are not offered.
"""

from __future__ import annotations

from ..errors import InputError

# Backends whose forward returns the log-sum-exp that ring attention needs (diffusers 0.42.1 attention_dispatch).
RING_BACKENDS = ("flash", "_native_cudnn", "sage")


def context_parallel_backends() -> list[str]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return sorted(b for b in _AttentionBackendRegistry._supports_context_parallel if not b.endswith("_hub"))


def resolve_backend(requested: str | None, ring_degree: int) -> str:
    """The backend name the ranks will run; InputError when it cannot do context parallelism (or ring)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = requested or _AttentionBackendRegistry.get_active_backend()[0].value
    usable = context_parallel_backends()
    if name not in usable:
        raise InputError(
            "attention_backend", f"'{name}' cannot split attention across GPUs (no context-parallel support).",
            f"pick one of {', '.join(usable)}.",
        )
    if ring_degree > 1 and name not in RING_BACKENDS:
        raise InputError(
            "ring_degree", f"ring attention needs a backend that returns the log-sum-exp; '{name}' does not.",
            f"use ring_degree 1 (Ulysses only) or a backend among {', '.join(RING_BACKENDS)}.",
        )
    return name
