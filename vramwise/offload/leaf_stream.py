"""A big non-denoiser component (UMT5-XXL, ~11 GB) run on the GPU one leaf module at a time, from the host
tensors it already has, holding no copy of its own.

Why not diffusers' ``apply_group_offloading(offload_type="leaf_level", use_stream=True)``, which the stream
placer used before: with a stream it builds a pinned copy of every weight up front (``low_cpu_mem_usage=False``),
so while it is placed the process holds the encoder twice (11.4 GB pageable + 11.4 GB pinned) and afterwards
keeps 11.4 GB pinned for as long as the model is loaded; with ``low_cpu_mem_usage=True`` it still keeps a dict of
references to the original host tensors, so the text encoder could never be released between prompts
(``encoder_weights``) and a reload would be overwritten by the stale tensors on the next offload. The encoder runs
once per new prompt (prompt embeddings are cached), so overlapping its copies buys little: here each leaf's
parameters are copied in right before it runs and dropped right after, and between calls the module's
parameters are its only reference to the host weights, so releasing them frees the memory.
"""

from __future__ import annotations

from typing import Any

import torch


def _leaves(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that own parameters or buffers directly (their own, not their children's)."""
    return [m for m in module.modules() if m._parameters or m._buffers]


class LeafStreamer:
    """Forward hooks on each leaf of ``module``: host tensors to ``device`` before the leaf runs, back after.

    Tied weights (UMT5's shared token embedding) are one Parameter seen by several leaves: each leaf moves only
    what is still on the host when it starts and puts back only what it moved.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = torch.device(device)
        self._handles: list[Any] = []
        # In flight only (between a leaf's pre- and post-hook): the host tensor each moved parameter came from.
        self._moved: dict[int, list[tuple[torch.nn.Module, str, bool, torch.Tensor]]] = {}
        self._in_flight: set[int] = set()  # ids of the tensors moved now (a tied weight is moved once)
        # Set by ``encoder_weights.EncoderWeights.streamed_from_files`` while a released encoder runs: called with
        # the leaf's empty placeholders, returns {id(parameter): host tensor read from the files}. The fetched
        # tensor is copied in and dropped; the placeholder is what goes back after the leaf.
        self.fetch: Any = None
        # The inputs follow the weights, at the top and at every leaf: a parent can build a leaf's input from the
        # leaf's weight device while the weight is still on the host (UMT5 computes its relative-position buckets
        # on ``relative_attention_bias.weight.device`` before calling that embedding: measured on an H100, the
        # first full-size run failed in index_select with the buckets on the CPU).
        self._handles.append(module.register_forward_pre_hook(self._inputs_to_device, with_kwargs=True))
        for leaf in _leaves(module):
            self._handles.append(leaf.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(leaf.register_forward_hook(self._post))

    def _inputs_to_device(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def move(x: Any) -> Any:
            return x.to(self.device) if isinstance(x, torch.Tensor) and x.device != self.device else x

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def _pre(self, leaf: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        moved = []
        fetched: dict[int, torch.Tensor] = {}
        if self.fetch is not None:
            empty = [t for t in leaf._parameters.values()
                     if t is not None and t.numel() == 0 and id(t) not in self._in_flight]
            if empty:
                fetched = self.fetch(empty)
        for table, is_param in ((leaf._parameters, True), (leaf._buffers, False)):
            for name, t in table.items():
                if t is None or id(t) in self._in_flight:
                    continue
                host = t.data if is_param else t
                src = fetched.pop(id(t), host) if is_param else host
                # copy=True: a real copy even where host and device are the same kind (the CPU tests see it)
                on = src.to(self.device, non_blocking=src.is_pinned(), copy=True)
                del src
                if is_param:
                    t.data = on
                    self._in_flight.add(id(t))
                else:
                    table[name] = on
                moved.append((leaf, name, is_param, host))
        if moved:
            self._moved[id(leaf)] = moved
        return self._inputs_to_device(leaf, args, kwargs)

    def _put_back(self, leaf_id: int) -> None:
        for owner, name, is_param, host in self._moved.pop(leaf_id, ()):
            if is_param:
                p = owner._parameters[name]
                p.data = host
                self._in_flight.discard(id(p))
            else:
                owner._buffers[name] = host

    def _post(self, leaf: torch.nn.Module, args: Any, output: Any) -> None:
        self._put_back(id(leaf))

    def restore_all(self) -> None:
        """After an error mid-forward (no post-hook ran): every moved tensor back to the host."""
        for key in list(self._moved):
            self._put_back(key)
        self._in_flight.clear()

    def remove(self) -> None:
        self.restore_all()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def stream_leaves(module: torch.nn.Module, device: torch.device) -> LeafStreamer:
    """Run ``module`` on ``device`` leaf by leaf from its host weights (see the module docstring)."""
    return LeafStreamer(module, device)


__all__ = ["LeafStreamer", "stream_leaves"]
