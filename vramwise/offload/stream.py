"""``stream`` offload: the denoiser's repeated blocks stream from pinned host memory through a few reused GPU slots.

How it works
- Each repeated block's parameters are packed once into one flat host buffer (pinned when CUDA is present), in
  their storage dtype: bf16, or fp8 for the big Linear weights. The block's parameters then point into that
  buffer, so host RAM holds the weights once.
- On the GPU there are ``depth + 1`` flat slot buffers, each the size of the largest block, allocated when a run
  starts and reused for every block of every step (no allocation per block). Block ``i`` is copied into a slot on
  a side stream while block ``i - 1`` computes; the compute stream waits on the copy's event, and the copy into a
  slot waits on the event recorded when the slot's previous block finished.
- fp8 parameters are laid out first in a block's buffer, so one cast kernel upcasts all of them into a single
  reused compute-dtype buffer before the block runs.
- Everything else of the denoiser (embedders, norms, proj_out) stays resident while a run lasts.
- The work is done by forward pre/post hooks on each block (block boundaries only): the blocks' own forward is
  untouched and may be compiled.
- On a machine without CUDA the same scheduler runs with synchronous copies, so the ordering logic is testable.
- Which blocks stream, which modules are transient and which lean forward applies come from the model's
  ``architectures`` description; the lean chunked forward itself is ``lean_wan``.
- Run-scoped weight patchers (``Placement.weight_patchers``) see each block once its slot is filled
  (``on_block_resident``); with none, nothing extra runs.

The placer also wraps each denoiser in a ``cfg_batching.CfgBatcher``, so both classifier-free-guidance passes
of a step run as one batch-2 forward and each block crosses PCIe once per denoising step instead of twice. What it
built is recorded on the ``Placement`` it is handed, never on the pipeline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..architectures import architecture_of
from ..device import host_available_bytes, trim_host_heap
from ..encoder_weights import ENCODER_WEIGHTS
from ..errors import InputError
from ..precision import module_bytes
from .cfg_batching import CfgBatcher
from .compile import compile_available, resolve_compile
from .lean_wan import DEFAULT_CHUNK_ROWS, LEAN_FORWARDS
from .leaf_stream import stream_leaves
from .components import components

if TYPE_CHECKING:
    from .expert_swap import SharedBlockHost
    from .lean_wan import LeanWan
    from .placement import Placement

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes; every tensor in a flat buffer starts on this boundary
FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
# Share of MemAvailable (plus what the blocks already hold) that may be pinned.
PINNED_SHARE = 0.85
# Non-denoiser components bigger than this (UMT5-XXL, ~11 GB) stream layer by layer while they run instead of
# moving to the GPU whole, so the stream plans fit cards smaller than the text encoder.
STREAM_OTHERS_ABOVE = 4 * 2**30


@dataclass
class StreamSettings:
    """How ``place_stream`` and each ``StreamOffload`` engine run (the engine reads the first eight)."""

    fp8_linear: bool = False
    depth: int | None = None  # blocks prefetched ahead; None: measured on the first forward of a run
    max_depth: int = 3
    pinned_cap_bytes: int | None = None
    ffn_chunk_tokens: int | None = 8192  # stock-forward blocks only; the lean forward chunks everything itself
    compile_blocks: bool | str = "auto"  # "auto": on with CUDA + Triton (see compile.resolve_compile)
    lean: bool = True
    chunk_rows: int | None = None
    cfg_batching: bool = True
    stream_others_above: int | None = STREAM_OTHERS_ABOVE


SETTINGS = StreamSettings()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class _Entry:
    module: torch.nn.Module
    name: str
    is_param: bool
    offset: int  # byte offset in the flat storage buffer
    numel: int
    shape: torch.Size
    dtype: torch.dtype  # storage dtype


@dataclass
class BlockLayout:
    """Where each tensor of one block lives in its flat buffer."""

    entries: list[_Entry]
    nbytes: int
    fp8_numel: int  # the first fp8_numel bytes are the fp8 region (element index == byte offset)
    host: torch.Tensor | None = None  # uint8, pinned when CUDA is present


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: its architecture description's block list; for a model without one, the
    outermost instances of the classes named in ``_repeated_blocks`` (or ``_no_split_modules``), in module order,
    else the members of a ``blocks`` ModuleList."""
    arch = architecture_of(model)
    if arch is not None:
        return arch.block_list(model)
    names = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or ())
    out: list[torch.nn.Module] = []
    prefixes: list[str] = []
    for qual, mod in model.named_modules():
        if mod is model or type(mod).__name__ not in names:
            continue
        if any(qual.startswith(p + ".") for p in prefixes):
            continue
        prefixes.append(qual)
        out.append(mod)
    if not out:
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, torch.nn.ModuleList):
            out = list(blocks)
    return out


def plan_layout(block: torch.nn.Module, fp8_linear: bool = False) -> BlockLayout:
    """Byte layout of a block: fp8 tensors first (so one kernel upcasts them), then the rest."""
    items = []
    for mod in block.modules():
        for name, p in mod._parameters.items():
            if p is None:
                continue
            dtype = p.dtype
            if fp8_linear and isinstance(mod, torch.nn.Linear) and name == "weight" and dtype.is_floating_point:
                dtype = FP8_DTYPES[0]
            items.append((mod, name, True, p, dtype))
        for name, b in mod._buffers.items():
            if b is None:
                continue
            items.append((mod, name, False, b, b.dtype))
    items.sort(key=lambda it: 0 if it[4] in FP8_DTYPES else 1)
    entries = []
    offset = 0
    fp8_numel = 0
    for mod, name, is_param, t, dtype in items:
        size = t.numel() * torch.empty((), dtype=dtype).element_size()
        entries.append(_Entry(mod, name, is_param, offset, t.numel(), t.shape, dtype))
        offset = _align(offset + size)
        if dtype in FP8_DTYPES:
            fp8_numel = offset
    return BlockLayout(entries, offset, fp8_numel)


def _view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
    size = e.numel * torch.empty((), dtype=e.dtype).element_size()
    return flat[e.offset:e.offset + size].view(e.dtype).view(e.shape)


def _set(e: _Entry, tensor: torch.Tensor) -> None:
    if e.is_param:
        e.module._parameters[e.name].data = tensor
    else:
        e.module._buffers[e.name] = tensor


def _get(e: _Entry) -> torch.Tensor:
    return e.module._parameters[e.name] if e.is_param else e.module._buffers[e.name]


def _neutralise_layerwise_casting(block: torch.nn.Module) -> None:
    """diffusers' layerwise casting would re-cast our views on every call; the stream engine upcasts itself."""
    for mod in block.modules():
        registry = getattr(mod, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            hook.pre_forward = lambda module, *args, **kwargs: (args, kwargs)
            hook.post_forward = lambda module, output: output


class _Sync:
    """Streams and events on CUDA; synchronous no-ops elsewhere (the scheduling code is the same)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.cuda else None

    def record(self, event, stream=None) -> None:
        if event is not None:
            event.record(stream if stream is not None else torch.cuda.current_stream())

    def wait(self, event, stream=None) -> None:
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)


class StreamOffload:
    """Streams one model's repeated blocks through ``depth + 1`` reused device slots.

    ``settings.depth``: blocks prefetched ahead of the one computing; ``None`` measures it on the first forward of
    a run (transfer time / compute time, capped by ``max_depth``) starting from 1. ``weight_patchers``: the
    placement's list (see ``placement.Placement``), shared, not copied.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        settings: StreamSettings | None = None,
        *,
        blocks: list[torch.nn.Module] | None = None,
        trace: bool = False,
        weight_patchers: list | None = None,
        expert_host: "SharedBlockHost | None" = None,
        weight_file: Any = None,
    ) -> None:
        s = settings or StreamSettings()
        self.model = model
        # The one-expert plan (expert_swap.py): block buffers shared with another engine, refilled from this
        # model's component folder ``weight_file`` when it activates while they hold the other's blocks.
        self.expert_host = expert_host
        self.weight_file = weight_file
        self.device = torch.device(device)
        self.blocks = blocks if blocks is not None else repeated_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no repeated blocks to stream")
        arch = architecture_of(model)
        self.weight_patchers = weight_patchers if weight_patchers is not None else []
        self.fixed_depth = s.depth
        self.depth = s.depth or 1
        self.max_depth = max(1, s.max_depth)
        self.sync = _Sync(self.device)
        compile_blocks = resolve_compile(s.compile_blocks) and self.sync.cuda
        self.trace_enabled = trace
        self.trace: list[tuple[str, int, int]] = []
        self.on_activate: Callable[[], None] | None = None
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        for b in self.blocks:
            _neutralise_layerwise_casting(b)
        self.layouts = [plan_layout(b, s.fp8_linear) for b in self.blocks]
        self.block_bytes = sum(l.nbytes for l in self.layouts)
        self.slot_bytes = max(l.nbytes for l in self.layouts)
        self.compute_dtype = self._compute_dtype()
        self.upcast_numel = max(l.fp8_numel for l in self.layouts)
        # Modules outside the blocks that run once per forward before the blocks (Wan's condition embedder,
        # ~0.5 GiB at 14B): held on the host and copied in only while they run, so they are not part of the peak.
        block_ids = {id(b) for b in self.blocks}
        transient = arch.transient_modules if arch is not None else ()
        self.transient = [m for m in (getattr(model, n, None) for n in transient)
                          if isinstance(m, torch.nn.Module) and id(m) not in block_ids]
        self.transient_layouts = [plan_layout(m) for m in self.transient]
        sharing = expert_host is not None and expert_host.buffers is not None
        if not sharing:
            self._check_host(s.pinned_cap_bytes)
        self._pack()
        self._handles: list[Any] = []
        self._ffn_originals: list[tuple[torch.nn.Module, bool]] = []
        self.lean: LeanWan | None = None
        lean_cls = LEAN_FORWARDS.get(arch.lean_forward) if arch is not None and arch.lean_forward else None
        if s.lean and lean_cls is not None:
            candidate = lean_cls(model, self.blocks, self.compute_dtype, s.chunk_rows or DEFAULT_CHUNK_ROWS,
                                 compiled=compile_blocks, weight_patchers=self.weight_patchers)
            if candidate.blocks or candidate.model_forward:
                self.lean = candidate
            else:
                candidate.remove()
        if s.ffn_chunk_tokens:
            self._chunk_ffn(int(s.ffn_chunk_tokens))
        self._compiled: list[torch.nn.Module] = []
        if compile_blocks:
            self._compile_blocks()
        # run state
        self.active = False
        self._slots: list[torch.Tensor] = []
        self._slot_free: list[Any] = []
        self._slot_of: dict[int, int] = {}  # block index -> slot
        self._occupant: list[int | None] = []
        self._ready: dict[int, Any] = {}  # block index -> copy-done event
        self._fresh: set[int] = set()  # blocks copied into their slot and not yet shown to the weight patchers
        self._next_slot = 0
        self._upcast: torch.Tensor | None = None
        self._measure: list[tuple[Any, Any]] | None = None
        self._pending_start: Any = None
        self._copy_timing: dict[int, tuple[Any, Any]] = {}
        self.measured_ratio: float | None = None
        self._install()

    # ---- setup -------------------------------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        """The dtype fp8 weights are upcast to: the most common non-fp8 float dtype among the Linear weights (then
        among all tensors), bf16 when every one is fp8."""
        for linear_only in (True, False):
            totals: dict[torch.dtype, int] = {}
            for l in self.layouts:
                for e in l.entries:
                    if linear_only and not (isinstance(e.module, torch.nn.Linear) and e.name == "weight"):
                        continue
                    if e.dtype.is_floating_point and e.dtype not in FP8_DTYPES:
                        totals[e.dtype] = totals.get(e.dtype, 0) + e.numel
            if totals:
                # Weights read as fp8 leave only norms and fp32-kept tensors: compute in 16 bits when any are.
                half = {d: n for d, n in totals.items() if d.itemsize == 2}
                return max(half or totals, key=(half or totals).get)
        return torch.bfloat16

    @property
    def pin(self) -> bool:
        return self.sync.cuda and torch.cuda.is_available()

    def _check_host(self, cap: int | None) -> None:
        held = sum(_get(e).numel() * _get(e).element_size() for l in self.layouts + self.transient_layouts
                   for e in l.entries
                   if _get(e).device.type == "cpu")
        if cap is None:
            cap = int((host_available_bytes() + held) * PINNED_SHARE)
        self.pinned_cap_bytes = cap
        if self.block_bytes > cap:
            raise InputError(
                "offload_mode",
                f"'stream' needs {self.block_bytes / 2**30:.1f} GiB of pinned host memory for the "
                f"{len(self.blocks)} denoiser blocks, but only {cap / 2**30:.1f} GiB can be pinned on this machine.",
                "pick weight_dtype fp8_e4m3fn (halves it), offload_mode 'group' or 'sequential', or free host RAM "
                "(close other programs).",
            )

    def _pack(self) -> None:
        """Move every block's tensors into its flat host buffer and point the block at views of it."""
        shared = self.expert_host
        if shared is not None and shared.buffers is not None:
            self._share_blocks(shared)
            layouts = self.transient_layouts
        else:
            layouts = self.layouts + self.transient_layouts
        self._pack_layouts(layouts)
        if shared is not None and shared.buffers is None:
            shared.adopt(self)

    def _share_blocks(self, shared: "SharedBlockHost") -> None:
        """Point this engine's (unread, meta) blocks at the buffers of the engine that packed first."""
        from .expert_swap import same_layout

        if not same_layout(shared.owner.layouts, self.layouts):
            raise ValueError("the experts' blocks differ in layout: they cannot share one set of host buffers")
        for layout, host in zip(self.layouts, shared.buffers):
            layout.host = host
            for e in layout.entries:
                view = _view(host, e)
                if e.is_param:
                    # a meta Parameter cannot take host data through .data: replace it (nothing holds it yet)
                    e.module._parameters[e.name] = torch.nn.Parameter(view, requires_grad=False)
                else:
                    e.module._buffers[e.name] = view

    def _pack_layouts(self, layouts: list[BlockLayout]) -> None:
        for layout in layouts:
            host = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=self.pin)
            for e in layout.entries:
                view = _view(host, e)
                src = _get(e).detach()
                view.copy_(src.to("cpu"))
                _set(e, view)
            layout.host = host
            # The tensors just repacked may have lived on the glibc heap, which keeps what is freed: measured on
            # an H100 (2026-12-06), a Wan2.1 14B load read into fp8 (26 MiB attention weights, under glibc's grown
            # mmap threshold) peaked at 31.7 GiB against 21.5 GiB once loaded, the second copy returned only by
            # the load's final trim. Trimming after each block (a 14B block is 385-770 MiB) keeps one copy.
            trim_host_heap()

    def _chunk_ffn(self, chunk: int) -> None:
        """Run each block's feed-forward over slices of ``chunk`` tokens: row-wise identical, a fraction of the peak."""
        for b in self.blocks:
            if "forward" in b.__dict__:  # the lean forward chunks the FFN itself
                continue
            ffn = getattr(b, "ffn", None)
            if not isinstance(ffn, torch.nn.Module):
                continue
            had = "forward" in ffn.__dict__
            self._ffn_originals.append((ffn, had))
            inner = ffn.forward

            def chunked(hidden_states, *args, _inner=inner, **kwargs):
                if hidden_states.dim() < 3 or hidden_states.shape[1] <= chunk:
                    return _inner(hidden_states, *args, **kwargs)
                outs = [_inner(part, *args, **kwargs) for part in hidden_states.split(chunk, dim=1)]
                return torch.cat(outs, dim=1)

            ffn.forward = chunked

    def _compile_blocks(self) -> None:
        """Regional compilation: each block's own forward, so the streaming hooks (module hooks, outside forward)
        never enter the graph; blocks share one compiled graph per input shape."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for b in self.blocks:
            if "forward" not in b.__dict__:
                b.forward = torch.compile(b.forward, fullgraph=True, dynamic=False)
                self._compiled.append(b)

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre))
        self._handles.append(self.model.register_forward_hook(self._model_post))
        for b in self.blocks:
            self._handles.append(b.register_forward_pre_hook(self._block_pre))
            self._handles.append(b.register_forward_hook(self._block_post))
        for m, layout in zip(self.transient, self.transient_layouts):
            self._handles.append(m.register_forward_pre_hook(
                lambda mod, args, _l=layout: self._transient_in(_l)))
            self._handles.append(m.register_forward_hook(
                lambda mod, args, out, _l=layout: self._transient_out(_l)))

    def remove(self) -> None:
        """Detach the hooks (weights stay in the host buffers, usable on the CPU)."""
        self.release()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self._compiled:
            b.__dict__.pop("forward", None)
        self._compiled.clear()
        if self.lean is not None:
            self.lean.remove()
            self.lean = None
        for ffn, had in self._ffn_originals:
            if not had and "forward" in ffn.__dict__:
                del ffn.forward
        self._ffn_originals.clear()

    # ---- run lifetime ------------------------------------------------------------------------------------------
    def resident_modules(self) -> list[torch.nn.Module]:
        block_ids = {id(b) for b in self.blocks}
        out = []

        def walk(mod: torch.nn.Module) -> None:
            for child in mod.children():
                if id(child) in block_ids:
                    continue
                out.append(child)
                walk(child)

        walk(self.model)
        transient = {id(m) for t in self.transient for m in t.modules()}
        return [m for m in out if id(m) not in transient]

    def _move_resident(self, device: torch.device) -> None:
        block_ids = {id(b) for b in self.blocks} | {id(m) for m in self.transient}
        for name, p in self.model.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in list(self.model._buffers.items()):
            if b is not None:
                self.model._buffers[name] = b.to(device)
        for child in self.model.children():
            if id(child) in block_ids:
                continue
            if isinstance(child, torch.nn.ModuleList) and any(id(c) in block_ids for c in child):
                continue
            child.to(device)

    def activate(self) -> None:
        if self.active:
            return
        if self.on_activate is not None:
            self.on_activate()
        if self.expert_host is not None:
            self.expert_host.take(self)  # re-reads this expert's blocks if the buffers hold the other's
        self._move_resident(self.device)
        n_slots = self.depth + 1
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self._slot_free = [None] * n_slots
        self._occupant = [None] * n_slots
        self._slot_of.clear()
        self._ready.clear()
        self._fresh.clear()
        self._next_slot = 0
        self._upcast = None  # allocated on first need (blocks the lean forward covers stay fp8)
        self.active = True
        if self.fixed_depth is None and self.sync.cuda and self.measured_ratio is None:
            self._measure = []

    def release(self) -> None:
        """End of a run: point blocks back at host memory, free the slots, move the resident parts off the GPU."""
        if not self.active:
            return
        if self.sync.cuda:
            torch.cuda.synchronize(self.device)
        for layout in self.layouts + self.transient_layouts:
            for e in layout.entries:
                _set(e, _view(layout.host, e))
        self._slots, self._slot_free, self._occupant = [], [], []
        self._slot_of.clear()
        self._ready.clear()
        self._fresh.clear()
        self._upcast = None
        self._move_resident(torch.device("cpu"))
        self.active = False

    # ---- scheduling --------------------------------------------------------------------------------------------
    def _issue(self, i: int) -> None:
        """Start copying block ``i`` into the next slot of the ring (evicting its occupant)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self._slots)
        old = self._occupant[slot]
        if old is not None:
            self._slot_of.pop(old, None)
            self._ready.pop(old, None)
        self._occupant[slot] = i
        self._slot_of[i] = slot
        self._fresh.add(i)
        layout = self.layouts[i]
        dst = self._slots[slot][:layout.nbytes]
        if self.sync.cuda:
            stream = self.sync.copy_stream
            self.sync.wait(self._slot_free[slot], stream)
            timing = self._measure is not None
            start = self.sync.event(timing) if timing else None
            with torch.cuda.stream(stream):
                if start is not None:
                    start.record(stream)
                dst.copy_(layout.host, non_blocking=True)
                done = self.sync.event(timing)
                done.record(stream)
            if start is not None:
                self._copy_timing[i] = (start, done)
            self._ready[i] = done
        else:
            dst.copy_(layout.host)
            self._ready[i] = None
        if self.trace_enabled:
            self.trace.append(("load", i, slot))

    def _bind(self, i: int) -> bool:
        """Point block ``i`` at its slot; True when its compute weights were rebuilt (fp8 upcast buffer)."""
        slot = self._slot_of[i]
        layout = self.layouts[i]
        flat = self._slots[slot]
        self.sync.wait(self._ready[i])
        keep_fp8 = self.lean is not None and self.lean.covers(self.blocks[i])
        if layout.fp8_numel and not keep_fp8:
            if self._upcast is None:
                self._upcast = torch.empty(self.upcast_numel, dtype=self.compute_dtype, device=self.device)
            up = self._upcast[:layout.fp8_numel]
            up.copy_(flat[:layout.fp8_numel].view(FP8_DTYPES[0]))
        for e in layout.entries:
            if e.dtype in FP8_DTYPES and not keep_fp8:
                _set(e, up[e.offset:e.offset + e.numel].view(e.shape))
            else:
                _set(e, _view(flat, e))
        return bool(layout.fp8_numel and not keep_fp8)

    def _transient_in(self, layout: BlockLayout) -> None:
        if not self.active or self.device.type == "cpu":
            return
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        flat.copy_(layout.host, non_blocking=True)
        for e in layout.entries:
            _set(e, _view(flat, e))

    def _transient_out(self, layout: BlockLayout) -> None:
        # The GPU copy goes back to the allocator (same stream, so reuse is ordered after this module's kernels).
        for e in layout.entries:
            _set(e, _view(layout.host, e))

    def _block_pre(self, block: torch.nn.Module, args: Any) -> None:
        if not self.active:
            self.activate()
        i = self._index[id(block)]
        if i not in self._slot_of:
            self._issue(i)
        rebuilt = self._bind(i)
        if self.weight_patchers and (rebuilt or i in self._fresh):
            # On the compute stream, after the copy-done wait in _bind: edits land in the slot (or the upcast
            # buffer), so they vanish when it is refilled; the host buffer is never touched.
            for patcher in self.weight_patchers:
                patcher.on_block_resident(i, block)
        self._fresh.discard(i)
        if self.trace_enabled:
            self.trace.append(("run", i, self._slot_of[i]))
        n = len(self.blocks)
        for k in range(1, self.depth + 1):
            j = (i + k) % n
            if j not in self._slot_of:
                self._issue(j)
        if self._measure is not None:
            start = self.sync.event(True)
            start.record()
            self._pending_start = start

    def _block_post(self, block: torch.nn.Module, args: Any, output: Any) -> None:
        i = self._index[id(block)]
        slot = self._slot_of.get(i)
        if slot is None or not self.sync.cuda:
            return
        measuring = self._measure is not None
        done = self.sync.event(measuring)
        done.record()
        self._slot_free[slot] = done
        if measuring and self._pending_start is not None:
            self._measure.append((self._pending_start, done))
            self._pending_start = None

    def _model_pre(self, module: torch.nn.Module, args: Any) -> None:
        if not self.active:
            self.activate()

    def _model_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._measure is None:
            return
        marks, self._measure = self._measure, None
        torch.cuda.synchronize(self.device)
        compute = [a.elapsed_time(b) for a, b in marks]
        copies = [a.elapsed_time(b) for a, b in self._copy_timing.values()]
        self._copy_timing.clear()
        if not compute or not copies:
            return
        compute.sort()
        copies.sort()
        c = compute[len(compute) // 2]
        t = copies[len(copies) // 2]
        self.measured_ratio = t / max(c, 1e-6)
        want = max(1, min(self.max_depth, math.ceil(self.measured_ratio * 1.25)))
        log.info("stream offload: block compute %.2f ms, copy %.2f ms -> prefetch depth %d", c, t, want)
        if want != self.depth:
            # Takes effect at the next run's activation (slots are sized then).
            self.depth = want

    @property
    def compiled(self) -> bool:
        return bool(self._compiled) or (self.lean is not None and self.lean.compiled)

    def set_compile(self, on: bool) -> None:
        """Turn regional compilation on or off (never on the CPU); takes effect at the next forward."""
        on = bool(on) and self.sync.cuda
        if self.lean is not None:
            self.lean.set_compiled(on)
        if on and not self._compiled:
            self._compile_blocks()
        elif not on:
            for b in self._compiled:
                b.__dict__.pop("forward", None)
            self._compiled.clear()

    def describe(self) -> str:
        kind = "pinned host" if self.pin else "host"
        text = (f"{len(self.blocks)} blocks streamed from {self.block_bytes / 2**30:.2f} GiB {kind} memory through "
                f"{self.depth + 1} slots of {self.slot_bytes / 2**20:.0f} MiB")
        if self.lean is not None:
            text += f"; lean chunked forward on {len(self.lean.blocks)} blocks"
            text += " (compiled pieces)" if self.lean.compiled else ""
        if self.expert_host is not None:
            swaps = self.expert_host.swaps
            text += "; block buffers shared with the other expert (one pinned at a time"
            text += f", {len(swaps)} re-reads, last {swaps[-1]:.1f} s)" if swaps else ")"
        return text


# ---- placer -----------------------------------------------------------------------------------------------------
def place_stream(pipe: Any, placement: "Placement", skip: Iterable[str], denoisers: Iterable[str],
                 settings: StreamSettings | None = None) -> None:
    """Denoisers: streamed blocks + resident rest + CFG batching. Other components: moved on while they run.
    The engines and batchers go to ``placement`` (``stream_engines``, ``cfg_batchers``), with their release."""
    SETTINGS = settings or globals()["SETTINGS"]
    from accelerate import cpu_offload_with_hook

    device = placement.device
    denoisers = set(denoisers)
    engines: list[StreamOffload] = []
    batchers: list[CfgBatcher] = []
    hooks = []
    previous = None
    above = SETTINGS.stream_others_above
    for name, module in components(pipe, skip):
        if name in denoisers:
            continue
        # An encoder not read yet (encoder_weights.unread_encoder) counts with what it will hold.
        held = module_bytes(module) + ENCODER_WEIGHTS.released_bytes(module)
        if device.type == "cuda" and above is not None and held > above:
            # leaf by leaf from its own host weights, no second copy, releasable between prompts (leaf_stream.py)
            placement.leaf_streamers.append(stream_leaves(module, device))
            continue
        _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
        hooks.append(previous)

    def offload_others() -> None:
        for hook in hooks:
            hook.offload()
        for eng in engines:
            eng.release()

    shared = None
    if placement.expert_files and len(denoisers) == 2:
        from .expert_swap import SharedBlockHost

        shared = placement.expert_host = SharedBlockHost()
    # Loaded denoisers first: under the one-expert plan the first packs the buffers the unread one then shares.
    ordered = sorted((c for c in components(pipe, skip) if c[0] in denoisers),
                     key=lambda c: any(p.device.type == "meta" for p in c[1].parameters()))
    for name, module in ordered:
        eng = StreamOffload(module, device, SETTINGS, weight_patchers=placement.weight_patchers,
                            expert_host=shared, weight_file=placement.expert_files.get(name))
        eng.on_activate = offload_others
        engines.append(eng)
        if SETTINGS.cfg_batching:
            batchers.append(CfgBatcher(module))
    placement.stream_engines.extend(engines)
    # The family hands the negative prompt embeddings to these, so the first step is batched too.
    placement.cfg_batchers.extend(batchers)

    def release() -> None:
        for hook in hooks:
            hook.offload()
        for streamer in placement.leaf_streamers:
            streamer.restore_all()
        for eng in engines:
            eng.release()
        for b in batchers:
            b.reset()

    placement.on_release(release)


__all__ = ["StreamOffload", "place_stream", "StreamSettings", "SETTINGS", "STREAM_OTHERS_ABOVE", "repeated_blocks",
           "compile_available", "resolve_compile"]
