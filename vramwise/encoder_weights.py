"""Text-encoder weights that leave host RAM between prompts and come back from their safetensors files.

UMT5-XXL (Wan) is ~11 GB in bf16 and Qwen2-VL 7B (EasyAnimate) ~15 GB, but they run once per new prompt: with the
prompt-embedding cache (``prompt_cache.py``) a re-run of the same prompt never calls them. So after encoding, each
parameter's storage is swapped for an empty tensor (the Parameter objects, and every hook that refers to them,
stay), and on the next cache miss the weights are read back one tensor at a time from the files they were loaded
from, cast to the dtype and put on the device each parameter had. Reloading never holds more than one extra
tensor. Which files and names to read is a ``WeightSource``, built once from where the pipeline was loaded.

A module is left alone (kept resident) when its weights are held somewhere we cannot reach: accelerate's
sequential offload keeps them in the hook's weights map (parameters on ``meta``), and diffusers' group offloading
keeps its own (pinned) CPU copies; releasing our view would free nothing there.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

log = logging.getLogger(__name__)

# Reads {target name: tensor} for the names asked, one tensor at a time.
_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
TensorReader = Callable[[set[str]], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class WeightSource:
    """Where a module's weights can be read again: the names it offers and a reader."""

    names: frozenset[str]
    read: TensorReader = field(compare=False)
    description: str = ""
    # The dtype the loader converted to before fp8 storage cast again: a wider stored weight goes through it on
    # its way to fp8, so the reloaded values are bit-identical to the first load (direct fp32 -> fp8 rounds
    # differently from fp32 -> bf16 -> fp8).
    load_dtype: torch.dtype | None = None


def safetensors_source(files: Iterable[Path], load_dtype: torch.dtype | None = None) -> WeightSource | None:
    """A source over safetensors files whose tensor names are the module's own (diffusers/transformers folders)."""
    from .weight_loading import read_tensor, stored_tensors

    files = sorted(Path(f) for f in files)
    if not files:
        return None
    where: dict[str, tuple[Path, Any]] = {}
    for path in files:
        for st in stored_tensors(path):
            where.setdefault(st.name, (path, st))

    def read(wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        # Plain file reads, one tensor at a time, in file order: the page cache holds the file's bytes, not this
        # process (a memory-mapped read would count every page it touched as our resident memory while mapped,
        # which is what the streamed encoder, reading ~11 GB per new prompt, must not do).
        for path in files:
            todo = sorted((where[n][1] for n in wanted if n in where and where[n][0] == path), key=lambda t: t.offset)
            if not todo:
                continue
            with open(path, "rb", buffering=0) as f:
                for st in todo:
                    yield st.name, read_tensor(f, st, st.dtype)

    return WeightSource(frozenset(where), read, ", ".join(p.name for p in files), load_dtype)


def folder_source(component_folder: Path, load_dtype: torch.dtype | None = None) -> WeightSource | None:
    folder = Path(component_folder)
    return safetensors_source(folder.glob("*.safetensors"), load_dtype) if folder.is_dir() else None


def pretrained_source(module: torch.nn.Module, folder: Path, load_dtype: torch.dtype) -> WeightSource:
    """A source that re-reads a transformers model with its own ``from_pretrained``.

    For models whose checkpoint names differ from their parameter names (transformers 5 renames and converts
    weights while loading, e.g. Qwen2-VL's ``model.*`` -> ``model.language_model.*``): a temporary model is loaded
    (its tensors alias the memory-mapped files) and its tensors are handed over by name, so only one copy exists.
    """
    cls, folder = type(module), Path(folder)
    names = frozenset(n for n, _ in module.named_parameters(remove_duplicate=False))

    def read(wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        fresh = cls.from_pretrained(folder, dtype=load_dtype)
        params = dict(fresh.named_parameters(remove_duplicate=False))
        del fresh
        for n in wanted:
            yield n, params.pop(n).data

    return WeightSource(names, read, f"{folder.name} (from_pretrained)", load_dtype)


@dataclass
class _Released:
    source: WeightSource
    # per Parameter object (tied weights share one): one name to read it by, its dtype and device
    params: list[tuple[torch.nn.Parameter, str, torch.dtype, torch.device]]
    nbytes: int
    # Restores the weights if anything calls the module while they are out (code that does not go through
    # prompt_cache.encode_prompts still gets a working encoder).
    guard: Any = None


@dataclass
class EncoderWeights:
    """The release state of the text encoders this pack placed; owned by the pack, keyed weakly by module."""

    _sources: "weakref.WeakKeyDictionary[torch.nn.Module, WeightSource]" = field(
        default_factory=weakref.WeakKeyDictionary)
    _released: "weakref.WeakKeyDictionary[torch.nn.Module, _Released]" = field(
        default_factory=weakref.WeakKeyDictionary)
    reloads: int = 0
    releases: int = 0
    streamed: int = 0  # encodes run leaf by leaf from the files (streamed_from_files)
    streamed_read_s: float = 0.0  # seconds those encodes spent reading the files (the rest is copy and compute)

    def register(self, module: torch.nn.Module, source: WeightSource | None) -> None:
        """Say where ``module``'s weights can be re-read; without a source it is never released."""
        if source is not None:
            self._sources[module] = source

    def knows(self, module: torch.nn.Module) -> bool:
        return module in self._sources

    def is_released(self, module: torch.nn.Module | None) -> bool:
        return module is not None and module in self._released

    def why_kept(self, module: torch.nn.Module) -> str | None:
        """Why ``module`` cannot be released, or None when it can."""
        source = self._sources.get(module)
        if source is None:
            return "no weight files to reload it from"
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is not None and any("group_offloading" in n for n in getattr(registry, "hooks", {})):
                return "diffusers group offloading holds its own copy of the weights"
            hook = getattr(sub, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                return "accelerate's sequential offload holds the weights"
        names = _names_by_param(module)
        for p, ns in names:
            if p.device.type == "meta":
                return "its weights are not materialised (meta)"
            if not any(n in source.names for n in ns):
                return f"'{ns[0]}' is not in {source.description}"
        return None

    def release(self, module: torch.nn.Module) -> int:
        """Drop ``module``'s parameter storage (host or device); returns the bytes let go (0 when kept)."""
        if module in self._released:
            return 0
        why = self.why_kept(module)
        if why is not None:
            log.debug("text encoder %s stays loaded: %s", type(module).__name__, why)
            return 0
        source = self._sources[module]
        params = []
        nbytes = 0
        for p, ns in _names_by_param(module):
            name = next(n for n in ns if n in source.names)
            params.append((p, name, p.dtype, p.device))
            nbytes += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._keep_released(module, _Released(source, params, nbytes))
        self.releases += 1
        return nbytes

    def restore(self, module: torch.nn.Module) -> bool:
        """Read a released module's weights back from its files; False when it was not released."""
        state = self._released.pop(module, None)
        if state is None:
            return False
        state.guard.remove()
        by_name = {name: p for p, name, _, _ in state.params}
        got = set()
        try:
            for name, tensor in state.source.read(set(by_name)):
                p = by_name[name]
                # Into the dtype and device the placeholder has now: whatever cast or moved the module while its
                # weights were out (fp8 storage, a placer) cast or moved the placeholder too.
                p.data = _as_stored(tensor, p, state.source).to(device=p.device)
                got.add(name)
        except BaseException:
            # Leave it released (and retryable) rather than half-loaded.
            for p, _, _, _ in state.params:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._keep_released(module, state)
            raise
        missing = set(by_name) - got
        if missing:
            self._keep_released(module, state)
            raise RuntimeError(f"{state.source.description} no longer holds {sorted(missing)[:3]}; the file changed on disk")
        self.reloads += 1
        return True

    def adopt_unread(self, module: torch.nn.Module, source: WeightSource) -> int:
        """Take a module built without its weights (parameters on ``meta``, in the dtypes a load would give) as
        released: its weights are first read when it is first called. Returns the bytes it will hold."""
        params, nbytes = [], 0
        for p, ns in _names_by_param(module):
            name = next((n for n in ns if n in source.names), None)
            if name is None:
                raise ValueError(f"'{ns[0]}' is not in {source.description}")
            # A meta tensor cannot take host storage through ``.data``: a new Parameter goes under every name of
            # the old one (tied weights stay one Parameter).
            new = torch.nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=False)
            for n in ns:
                owner, _, leaf = n.rpartition(".")
                module.get_submodule(owner)._parameters[leaf] = new
            params.append((new, name, p.dtype, new.device))
            nbytes += p.numel() * p.element_size()
        self._sources[module] = source
        self._keep_released(module, _Released(source, params, nbytes))
        return nbytes

    def released_bytes(self, module: torch.nn.Module) -> int:
        """What a released module holds once restored (0 when it is not released)."""
        state = self._released.get(module)
        return state.nbytes if state is not None else 0

    @contextmanager
    def streamed_from_files(self, module: torch.nn.Module, streamer: Any) -> Iterator[bool]:
        """While inside, a released ``module`` run under ``streamer`` (``leaf_stream.LeafStreamer``) reads each
        leaf's weights from its files right before the leaf runs and drops them after it: the encoder runs once
        per new prompt and this reads the same bytes a ``restore`` would, but the host never holds more than one
        leaf (UMT5-XXL's largest, the token embedding, is 2.1 GB of ~13 GB). Yields False, changing nothing, when
        the module is not released (the caller restores or runs it as it is)."""
        state = self._released.get(module)
        if state is None:
            yield False
            return
        by_id = {id(p): (p, name) for p, name, _, _ in state.params}

        def fetch(wanted: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
            t0 = time.perf_counter()
            names = {by_id[id(p)][1]: by_id[id(p)][0] for p in wanted if id(p) in by_id}
            got = {id(names[n]): _as_stored(t, names[n], state.source) for n, t in state.source.read(set(names))}
            self.streamed_read_s += time.perf_counter() - t0
            return got

        state.guard.remove()
        streamer.fetch = fetch
        try:
            yield True
        finally:
            streamer.restore_all()
            streamer.fetch = None
            self._keep_released(module, state)
            self.streamed += 1

    def _keep_released(self, module: torch.nn.Module, state: _Released) -> None:
        def guard(m: torch.nn.Module, args: Any) -> None:  # a pre-hook returning a value would replace the inputs
            self.restore(m)

        state.guard = module.register_forward_pre_hook(guard, prepend=True)
        self._released[module] = state

    def forget(self, module: torch.nn.Module) -> None:
        self._sources.pop(module, None)
        self._released.pop(module, None)


def unread_encoder(cls: Any, component_folder: Path, dtype: torch.dtype,
                   weights: "EncoderWeights | None" = None) -> torch.nn.Module | None:
    """A transformers encoder (UMT5) built from its ``config.json`` with no weight read, adopted as released by
    ``weights``: the first encode reads it (leaf by leaf from the files under the stream plan). None when the
    folder's files do not name every parameter (transformers maps those names while loading: load it as usual).

    Why: ``from_pretrained`` reads all ~11 GB of UMT5-XXL at load, memory-mapped (measured on an H100, 2026-12-06:
    load peak 31.7 GiB against 21.5 GiB once loaded), and the pack released it right after the first prompt anyway.
    """
    from accelerate import init_empty_weights

    source = folder_source(component_folder, dtype)
    if source is None:
        return None
    config = cls.config_class.from_pretrained(component_folder)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties the token embedding; a model built from its config is not tied yet
    model.eval()
    weights = weights if weights is not None else ENCODER_WEIGHTS
    try:
        weights.adopt_unread(model, source)
    except ValueError:
        return None
    return model


def _as_stored(tensor: torch.Tensor, p: torch.Tensor, source: WeightSource) -> torch.Tensor:
    """A tensor read from ``source`` in the dtype of ``p`` (its placeholder): a wider stored weight goes to fp8
    through the loader's dtype, so it rounds as the first load did."""
    if p.dtype in _FP8 and tensor.dtype not in _FP8 and source.load_dtype is not None:
        tensor = tensor.to(source.load_dtype)
    return tensor.to(dtype=p.dtype)


def _names_by_param(module: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each distinct Parameter with every name it is known by (tied weights have several)."""
    seen: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), (p, []))[1].append(name)
    return list(seen.values())


ENCODER_WEIGHTS = EncoderWeights()

__all__ = ["WeightSource", "EncoderWeights", "ENCODER_WEIGHTS", "safetensors_source", "folder_source",
           "pretrained_source", "unread_encoder"]
