"""Prompt embeddings cached by prompt and settings, so re-running a prompt never touches the text encoder.

Re-running the same prompt with another seed, size or step count is the common case; the text encoder (UMT5-XXL,
~11 GB in bf16) then has nothing to do. The cache is an LRU owned by the pack, bounded in bytes (a Wan entry with
its negative prompt is 2 x 512 x 4096 bf16 = 8 MiB), holding CPU copies. The key carries everything the
embeddings depend on: both prompts, whether CFG is on (the negative is encoded only then), the text encoder's
identity (its files and their size and mtime on disk), the weight dtype, the device kind it ran on, the maximum
token length and any family-specific setting.

On a miss, the text encoders released after the previous encode are read back from their files first
(``encoder_weights.py``), and released again after this one, so between prompts they hold no host RAM. An encoder
that the stream plan runs leaf by leaf (``offload/leaf_stream.py``) is not read back whole: each leaf's weights are
read from the files right before it runs, so a new prompt costs the same file reads and no ~11 GB on the host.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .encoder_weights import ENCODER_WEIGHTS, EncoderWeights, folder_source, pretrained_source

if TYPE_CHECKING:
    from .handles import LoadedPipeline

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 2**20

Embeds = tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class PromptKey:
    model: tuple  # identity of the text encoder weights (see encoder_identity)
    prompt: str
    negative_prompt: str
    do_cfg: bool
    dtype: str
    device: str
    max_length: int
    extra: tuple = ()


@dataclass(frozen=True)
class PromptCacheConfig:
    max_bytes: int = DEFAULT_MAX_BYTES
    # Drop the text encoders' weights after encoding and re-read them on the next miss.
    release_encoders: bool = True


def _nbytes(embeds: Embeds) -> int:
    return sum(t.numel() * t.element_size() for t in embeds if t is not None)


@dataclass
class PromptCache:
    config: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    hits: int = 0
    misses: int = 0
    _entries: "OrderedDict[PromptKey, Embeds]" = field(default_factory=OrderedDict)
    _bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PromptKey) -> Embeds | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            # Clones: a caller that changes its embeddings in place cannot change the cached ones.
            return tuple(t.clone() if t is not None else None for t in found)

    def put(self, key: PromptKey, embeds: Embeds) -> None:
        stored = tuple(t.detach().to("cpu", copy=True) if t is not None else None for t in embeds)
        size = _nbytes(stored)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            if size > self.config.max_bytes:
                return
            self._entries[key] = stored
            self._bytes += size
            while self._bytes > self.config.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= _nbytes(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


PROMPT_CACHE = PromptCache()


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
        return (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


def encoder_identity(loaded: "LoadedPipeline") -> tuple:
    """What the embeddings of ``loaded`` depend on besides the prompt: its text-encoder files and weight dtype."""
    options = loaded.options
    if options.source is not None:
        te = getattr(options.source, "text_encoder", None)
        files = (_stamp(Path(te)),) if te is not None else (repr(options.source),)
    else:
        folder = Path(options.folder)
        files = tuple(_stamp(p) for name in (*loaded.family.text_encoder_names, "tokenizer")
                      for p in sorted((folder / name).glob("*")) if p.is_file())
        files = (str(folder.resolve()),) + files
    return (loaded.family.id, options.weight_dtype.value) + files


def _source_for(loaded: "LoadedPipeline", name: str, module: torch.nn.Module):
    options = loaded.options
    dtype = options.weight_dtype.compute_dtype
    if options.source is not None:  # e.g. single_file.SingleFileSpec
        source_of = getattr(options.source, "weight_source", None)
        return source_of(name, dtype) if source_of is not None else None
    folder = Path(options.folder) / name
    source = folder_source(folder, dtype)
    covered = source is not None and all(n in source.names for n, _ in module.named_parameters())
    if not covered and callable(getattr(type(module), "from_pretrained", None)) and folder.is_dir():
        return pretrained_source(module, folder, dtype)  # checkpoint names differ: let transformers map them
    return source


def _encoders(loaded: "LoadedPipeline") -> list[torch.nn.Module]:
    pipe = loaded.pipe
    return [m for m in (getattr(pipe, n, None) for n in loaded.family.text_encoder_names)
            if isinstance(m, torch.nn.Module)]


def encode_prompts(
    loaded: "LoadedPipeline",
    prompt: str,
    negative_prompt: str,
    do_cfg: bool,
    max_length: int,
    encode: Callable[[], Sequence[torch.Tensor | None]],
    extra: tuple = (),
    cache: PromptCache = PROMPT_CACHE,
    weights: EncoderWeights = ENCODER_WEIGHTS,
) -> Embeds:
    """``encode()``'s result for these prompts, from the cache when it was computed before (on the CPU)."""
    key = PromptKey(
        model=encoder_identity(loaded), prompt=prompt, negative_prompt=negative_prompt if do_cfg else "",
        do_cfg=do_cfg, dtype=loaded.options.weight_dtype.value, device=loaded.text_device.type,
        max_length=int(max_length), extra=tuple(extra),
    )
    found = cache.get(key)
    if found is not None:
        return found
    encoders = _encoders(loaded)
    streamers = {id(s.module): s for s in getattr(loaded.placement, "leaf_streamers", ())}
    try:
        with ExitStack() as stack:
            for module in encoders:
                streamer = streamers.get(id(module))
                if streamer is None or not cache.config.release_encoders \
                        or not stack.enter_context(weights.streamed_from_files(module, streamer)):
                    weights.restore(module)
            with torch.no_grad():
                embeds = tuple(encode())
    finally:
        if cache.config.release_encoders:
            for name, module in zip(loaded.family.text_encoder_names, encoders):
                if not weights.knows(module):
                    weights.register(module, _source_for(loaded, name, module))
                freed = weights.release(module)
                if freed:
                    log.info("released %s (%.2f GiB) until the prompt changes", name, freed / 2**30)
    cache.put(key, embeds)
    return tuple(t.to("cpu") if t is not None else None for t in embeds)


__all__ = ["PromptKey", "PromptCache", "PromptCacheConfig", "PROMPT_CACHE", "encode_prompts", "encoder_identity"]
