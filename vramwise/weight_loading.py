"""Load a diffusers model folder (sharded safetensors) tensor by tensor into its final dtype, holding one copy.

Why not ``from_pretrained``: diffusers memory-maps each shard and hands out tensors that alias the mapping. Every
page a conversion or packing touches then counts as the process's resident memory until the last aliasing tensor
is gone, and tensors that are never repacked (norms, the non-block weights of a streamed model) keep whole shards
mapped. Measured with ``tests/test_host_memory.py``'s medium model (295 MiB of bf16 weights): ``from_pretrained``
then fp8 storage peaked at 475 MiB over the baseline for 150 MiB of final weights (the bf16 file pages plus the fp8
copies), and the stream placer at 448 MiB for 295 MiB. Here each tensor is read with plain file reads (the
page cache holds the bytes, not this process) straight into its final buffer, or into a one-tensor temporary when
it changes dtype on the way (bf16 -> fp8 for the layers fp8 storage will cast, anything -> fp32 for the modules
diffusers keeps in fp32), so the peak is the final size plus one tensor.

The model itself is built on the meta device from its ``config.json`` (accelerate's ``init_empty_weights``), as
``from_pretrained`` does, and the loaded tensors are assigned to it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ModelFolderError

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def stored_tensors(path: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file from its header, in file order."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = []
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelFolderError(f"'{path.name}': tensor '{name}' has dtype {info['dtype']}, which torch cannot hold.")
        start, end = info["data_offsets"]
        out.append(StoredTensor(name, dtype, tuple(info["shape"]), 8 + n + start, end - start))
    return sorted(out, key=lambda t: t.offset)


def _read_into(f, st: StoredTensor, out: torch.Tensor) -> None:
    f.seek(st.offset)
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < st.nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise ModelFolderError(f"'{Path(f.name).name}' ends inside tensor '{st.name}': the file is truncated.")
        done += got


# Bytes of the file read per step when a tensor is converted on the way in (read_tensor).
_CONVERT_CHUNK = 8 * 2**20


def read_tensor(f, st: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
    """One stored tensor in ``dtype``: read in place when the dtype matches, else converted on the way in, a few
    MiB at a time, into its final tensor.

    Why not read whole and ``.to(dtype)``: the full-size temporary and the result sit side by side on the glibc
    heap, and the freed temporaries leave holes the heap keeps. Measured on the medium test model (glibc's own
    mmap threshold): read into fp8 that way, the load held 80 MiB over its 151 MiB of weights; on an H100
    (2026-12-06) a Wan2.1 14B load into fp8 peaked 10 GiB over its final size."""
    if dtype == st.dtype:
        raw = torch.empty(st.shape, dtype=st.dtype)
        if raw.numel():
            _read_into(f, st, raw)
        return raw
    out = torch.empty(st.shape, dtype=dtype)
    n = out.numel()
    if not n:
        return out
    size = st.nbytes // n
    step = max(1, _CONVERT_CHUNK // size)
    scratch = torch.empty(min(step, n), dtype=st.dtype)
    flat = out.view(-1)
    for start in range(0, n, step):
        k = min(step, n - start)
        part = StoredTensor(st.name, st.dtype, (k,), st.offset + start * size, k * size)
        _read_into(f, part, scratch[:k])
        flat[start:start + k].copy_(scratch[:k])  # the same cast as .to(dtype)
    return out


def fp8_storage_names(model: torch.nn.Module, skip: Iterable[str]) -> set[str]:
    """Parameter names that ``precision.apply_fp8_storage`` (diffusers' layerwise casting) stores in fp8.

    The same rule as diffusers' ``_apply_layerwise_casting``: a module whose qualified name matches a skip pattern
    is skipped with everything under it; a Linear/Conv module met before that has all its parameters cast. Loading
    them as fp8 makes the later cast a no-op, so the bf16 copy never exists.
    """
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    skip = tuple(skip)
    out: set[str] = set()

    def walk(module: torch.nn.Module, prefix: str) -> None:
        if any(re.search(p, prefix) for p in skip):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            out.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return out


def _shards(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        with open(index[0], encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_model(cls: Any, folder: Path, dtype: torch.dtype, fp8_skip: Iterable[str] | None = None,
               unread_prefix: str | None = None) -> Any:
    """``cls`` (a diffusers ModelMixin) from ``folder`` in ``dtype``; with ``fp8_skip``, the layers fp8 storage
    casts are loaded as fp8 directly (fp8 storage applied afterwards finds them already cast). Tensors whose name
    starts with ``unread_prefix`` are not read: they stay on the meta device in the dtype they would have had
    (the stream engine's one-expert plan fills them from the file later)."""
    from accelerate import init_empty_weights

    given, folder = folder, Path(folder)  # the config records the name as given, as from_pretrained does
    files = _shards(folder)
    if not files or not all(p.is_file() for p in files):
        raise ModelFolderError(f"'{folder}' has no (or not all of its) .safetensors weight files.")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(folder))
    keep32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    fp8 = fp8_storage_names(model, fp8_skip) if fp8_skip is not None else set()
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            for st in stored_tensors(path):
                if st.name not in expected:
                    continue
                want = st.dtype
                if st.dtype.is_floating_point:
                    if st.name in fp8:
                        want = FP8
                    elif any(m in st.name.split(".") for m in keep32):
                        want = torch.float32
                    else:
                        want = dtype
                if unread_prefix is not None and st.name.startswith(unread_prefix):
                    _assign(model, st.name, torch.empty(st.shape, dtype=want, device="meta"))
                else:
                    _assign(model, st.name, read_tensor(f, st, want))
                seen.add(st.name)
    missing = sorted(expected - seen)
    if missing:
        raise ModelFolderError(
            f"'{folder.name}' lacks {len(missing)} weights of its {cls.__name__} (e.g. {missing[:3]}): the download "
            "is incomplete; copy or download that folder again."
        )
    model.register_to_config(_name_or_path=given)
    return model.eval()


def load_denoisers(folder: Path, names: Iterable[str], dtype: torch.dtype,
                   fp8_skip: Iterable[str] | None = None, unread_blocks: Iterable[str] = ()) -> dict[str, Any]:
    """{component name: model} for the named components of a pipeline folder (classes from model_index.json);
    the repeated blocks (``blocks.``) of the components in ``unread_blocks`` are left unread (meta)."""
    unread = set(unread_blocks)
    import diffusers

    with open(Path(folder) / "model_index.json", encoding="utf-8") as f:
        index = json.load(f)
    out = {}
    for name in names:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        out[name] = load_model(getattr(diffusers, entry[1]), Path(folder) / name, dtype, fp8_skip,
                               "blocks." if name in unread else None)
    return out


__all__ = ["load_model", "load_denoisers", "fp8_storage_names", "stored_tensors", "read_tensor", "StoredTensor"]
