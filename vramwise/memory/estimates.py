"""Memory estimates from shapes: weight bytes per component (safetensors headers or live modules), activation bytes
per token from factors calibrated on an H200 (bench/RESULTS.md, "Offload engine").

Calibration (Wan2.1-I2V-14B transformer, batch-2 CFG step, 480x832, stream mode, FFN chunked at 4096 tokens):
peak = fixed part (2 block slots + resident non-block weights, ~2.1 GiB) + tokens x batch x hidden x factor, with
factor ~21.6 bytes eager and ~11.8 bytes with regional torch.compile (33 and 81 frames both fit this line; the
all-on-GPU 81-frame peak, 37.5 GiB, is weights 30.5 GiB + the same eager term).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ACT_BYTES_PER_TOKEN_HIDDEN_EAGER = 21.6
ACT_BYTES_PER_TOKEN_HIDDEN_COMPILED = 11.8
# Lean chunked forward (offload/lean_wan.py): the whole-sequence tensors alive in a block are the hidden states
# (updated in place) plus keys and values, plus one chunk's temporaries (4,096 rows). Measured on an H200
# (bench/RESULTS.md, "Offload engine", round 2): 81 frames 3.85 GiB eager / 3.67 compiled, 33 frames 2.75 / 2.56,
# for slots 1.5 GiB + this term. The non-block weights (mostly the condition embedder) are on the GPU only before
# the blocks run, so the planner counts them in a separate, earlier phase (planner.estimate).
LEAN_SEQUENCE_TENSORS = 3
LEAN_CHUNK_BYTES = int(0.45 * 2**30)
# Token merging (token_merge/), measured on an H100 (bench/RESULTS.md, "Token merge, round 3"), batch-2 CFG, 81
# frames, compiled: in the lean forward the merged key/value groups live next to the full keys/values while they are
# reduced: 4.81 GiB allocated vs 3.68 unmerged, i.e. this many bytes per token x hidden more. Where a block runs
# diffusers' own forward with the merge processor (plans other than stream), the merged attention holds full
# queries and keys next to the groups and two group outputs: 8.56 GiB = slots 1.5 GiB + 22.6 bytes per token x
# hidden, the compiled stock factor plus the second constant (eager runs are not measured; it is added to the
# eager factor too).
LEAN_TOKEN_MERGE_EXTRA_BYTES_PER_TOKEN_HIDDEN = 3.6
TOKEN_MERGE_EXTRA_BYTES_PER_TOKEN_HIDDEN = 10.8
# A component streamed leaf by leaf (offload.stream.STREAM_OTHERS_ABOVE) needs its largest leaf (UMT5-XXL's
# 2.1 GB token embedding) plus activations.
STREAMED_COMPONENT_PEAK = int(2.5 * 2**30)
# Host bytes a CUDA process running a plan holds besides the weights: the CUDA context and its libraries (0.87 GiB
# after `import torch` + CUDA init), torch.compile's graphs and Triton kernels, the 81 frames in and out (float32
# on the host: 0.39 GB each way at 480x832), allocator fragmentation. Measured on an H100 (2026-12-06,
# bench/host_ram_bench.py): Wan2.1 14B peaked at 32.57 GiB VmHWM with 27.3 GiB of planned weights.
PROCESS_HOST_BYTES = int(5.25 * 2**30)
# Allocator slack and CUDA context outside torch's count.
FIXED_OVERHEAD = int(0.6 * 2**30)

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1,
                "U8": 1, "BOOL": 1, "I16": 2}


def safetensors_tensors(path: Path) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of each tensor in a safetensors file, read from its header only (no weights are loaded)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        out[name] = (numel, numel * _DTYPE_BYTES.get(info["dtype"], 2))
    return out


def safetensors_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its header only (no weights are loaded)."""
    return {name: nbytes for name, (_, nbytes) in safetensors_tensors(path).items()}


def folder_component_bytes(folder: Path) -> dict[str, int]:
    """Weight bytes per component folder of a diffusers pipeline folder, as stored on disk."""
    out: dict[str, int] = {}
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        total = 0
        for st in sub.glob("*.safetensors"):
            total += sum(safetensors_bytes(st).values())
        if total:
            out[sub.name] = total
    return out


def _as_int(value: Any, default: int) -> int:
    """Config numbers come as ints, per-level lists (UNets) or None; take the largest level."""
    if isinstance(value, (list, tuple)):
        value = max((v for v in value if v is not None), default=None)
    return int(value) if value is not None else default


def _as_patch(value: Any) -> tuple[int, int, int]:
    """Patch sizes come as (t, h, w), as one int for square spatial patches (EasyAnimate), or not at all (UNets)."""
    if value is None:
        return (1, 2, 2)
    if isinstance(value, int):
        return (1, value, value)
    dims = tuple(int(v) for v in value)
    return dims if len(dims) == 3 else (1,) + (dims[-2:] if len(dims) >= 2 else (dims[0], dims[0]))


@dataclass(frozen=True)
class DenoiserShape:
    """What the activation estimate needs of a denoiser."""

    hidden: int
    layers: int
    block_bytes: int  # bytes of one repeated block in compute dtype
    non_block_bytes: int
    total_bytes: int
    patch: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_config(cls, config: dict[str, Any], total_bytes: int) -> "DenoiserShape":
        heads = _as_int(config.get("num_attention_heads"), 40)
        head_dim = _as_int(config.get("attention_head_dim"), 128)
        hidden = heads * head_dim
        layers = max(1, _as_int(config.get("num_layers"), 40))
        ffn = _as_int(config.get("ffn_dim"), 4 * hidden)
        added = config.get("added_kv_proj_dim")
        # attn1: 4 x h^2, attn2: 4 x h^2 (+2 x added x h for image keys/values), ffn: 2 x h x ffn, bytes in bf16
        per_block = (8 * hidden * hidden + 2 * hidden * ffn + (2 * int(added) * hidden if added else 0)) * 2
        per_block = min(per_block, total_bytes // layers)
        patch = _as_patch(config.get("patch_size"))
        return cls(hidden, layers, per_block, max(0, total_bytes - per_block * layers), total_bytes, patch)

    @classmethod
    def from_module(cls, module: torch.nn.Module, blocks: list[torch.nn.Module]) -> "DenoiserShape":
        def nbytes(m: torch.nn.Module) -> int:
            # In compute dtype (the plans halve it for fp8 storage): a model loaded in fp8 counts 2 bytes per weight.
            return sum(t.numel() * (2 if t.element_size() == 1 and t.is_floating_point() else t.element_size())
                       for t in list(m.parameters()) + list(m.buffers()))

        total = nbytes(module)
        block = max((nbytes(b) for b in blocks), default=0)
        config = dict(getattr(module, "config", {}) or {})
        heads = _as_int(config.get("num_attention_heads"), 1)
        hidden = heads * _as_int(config.get("attention_head_dim"), 1) if config else 1
        return cls(hidden, len(blocks), block, max(0, total - block * len(blocks)), total,
                   _as_patch(config.get("patch_size")))


def tokens(latent_frames: int, latent_height: int, latent_width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    pt, ph, pw = patch
    return (latent_frames // pt) * (latent_height // ph) * (latent_width // pw)


def activation_bytes(n_tokens: int, hidden: int, batch: int, compiled: bool = False) -> int:
    factor = ACT_BYTES_PER_TOKEN_HIDDEN_COMPILED if compiled else ACT_BYTES_PER_TOKEN_HIDDEN_EAGER
    return int(n_tokens * batch * hidden * factor)


def token_merge_extra_bytes(n_tokens: int, hidden: int, batch: int, lean: bool) -> int:
    factor = LEAN_TOKEN_MERGE_EXTRA_BYTES_PER_TOKEN_HIDDEN if lean else TOKEN_MERGE_EXTRA_BYTES_PER_TOKEN_HIDDEN
    return int(n_tokens * batch * hidden * factor)


def lean_activation_bytes(n_tokens: int, hidden: int, batch: int) -> int:
    return int(LEAN_SEQUENCE_TENSORS * n_tokens * batch * hidden * 2 + LEAN_CHUNK_BYTES)
