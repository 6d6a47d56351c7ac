"""Load a model folder into a placed pipeline, and keep loaded pipelines between prompts.

The cache is keyed by the loader node that asked (its slot) so two loaders in one workflow don't evict each
other, while a loader whose inputs changed releases its old pipeline before loading the new one: holding two
14B models at once is exactly the out-of-memory the pack exists to avoid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, Callable

import torch

from .device import allocated_bytes, release_memory, trim_host_heap
from .encoder_weights import ENCODER_WEIGHTS
from .errors import InputError, ModelFolderError, VramwiseError
from .families import detect_family
from .handles import LoadedPipeline, LoadOptions  # LoadOptions lives with the other values passed between nodes
from .memory import planner
from .offload import DESCRIPTIONS, OffloadMode, Placement, StreamSettings, apply_offload
from .offload.stream import SETTINGS as STREAM_SETTINGS
from .precision import DENOISER_FP8_SKIP, TEXT_ENCODER_FP8_SKIP, WeightDtype, apply_fp8_storage

log = logging.getLogger(__name__)


def load_pipeline(options: LoadOptions, device: torch.device) -> LoadedPipeline:
    """Detect the family, load the weights (safetensors only), apply precision and offload placement."""
    source = options.source
    family = source.family() if source is not None else detect_family(options.folder)
    refused = family.unsupported_offload_modes.get(options.offload_mode.value)
    if refused:
        usable = ", ".join(m.value for m in OffloadMode if m.value not in family.unsupported_offload_modes)
        raise InputError(
            "offload_mode", f"'{options.offload_mode.value}' does not work with {family.label}: {refused}.",
            f"pick one of {usable}.",
        )
    preplan = _host_preplan(options, family, device)
    try:
        if source is not None:
            keep_fp8 = options.weight_dtype is WeightDtype.FP8_E4M3FN
            pipe = source.load(options.weight_dtype.compute_dtype, keep_fp8=keep_fp8)
        else:
            # fp8 storage: families that can read the layers it casts straight into fp8 skip the bf16 copy.
            fp8 = (options.weight_dtype is WeightDtype.FP8_E4M3FN or preplan.fp8) and family.loads_fp8_directly
            kw = {"fp8_skip": DENOISER_FP8_SKIP + family.fp8_skip_patterns} if fp8 else {}
            if preplan.one_expert:
                kw["unread_blocks"] = family.denoiser_names[1:]  # filled from their files when their turn comes
            if _text_encoder_unread(options, family):
                kw["unread_text_encoder"] = True
            pipe = family.load(options.folder, options.weight_dtype.compute_dtype, **kw)
    except VramwiseError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise ModelFolderError(
            f"Could not load '{options.folder.name}' as {family.label}: {type(e).__name__}: {e}. "
            "The folder looks incomplete or corrupt; copy or download it again (every component folder with its "
            "config.json and *.safetensors weights)."
        ) from e
    notes = [f"{family.label} from '{options.folder.name}'"]
    placement = Placement(device=device, fp8_skip=DENOISER_FP8_SKIP + family.fp8_skip_patterns)
    if preplan.one_expert:
        placement.expert_files = {n: options.folder / n for n in family.denoiser_names}
    if options.weight_dtype is WeightDtype.FP8_E4M3FN:
        targets = [(getattr(pipe, n, None), placement.fp8_skip) for n in family.denoiser_names]
        targets += [(getattr(pipe, n, None), TEXT_ENCODER_FP8_SKIP) for n in family.text_encoder_names]
        notes += apply_fp8_storage(targets, options.weight_dtype.compute_dtype)
    # Components left where they are by the placers (a CPU text encoder); not the fp8 skip patterns above.
    keep_on_cpu = family.text_encoder_names if options.text_encoder_on_cpu else ()
    mode, settings, auto_notes = options.offload_mode, None, []
    host = planner.host_budget(options.host_ram_budget_gb, held=planner.held_bytes(pipe, family.denoiser_names))
    unread = [n for n in family.text_encoder_names if ENCODER_WEIGHTS.is_released(getattr(pipe, n, None))]
    if mode is OffloadMode.AUTO:
        mode, settings, auto_notes = _resolve_auto(pipe, family.denoiser_names, placement, options.weight_dtype, host,
                                                   fp8_only=preplan.fp8, one_expert=preplan.one_expert,
                                                   unread=unread)
        if preplan.fp8:
            auto_notes.append("host RAM: only fp8 storage fits the host budget, so the denoiser weights were read "
                              "straight into fp8 (no bf16 copy)")
    if placement.plan is not None:
        auto_notes.append(f"host RAM: the plan holds ~{placement.plan.host_bytes / 2**30:.1f} GiB "
                          f"({placement.plan.pinned_bytes / 2**30:.1f} GiB pinned) of a {host / 2**30:.1f} GiB budget")
    if mode is OffloadMode.STREAM and options.host_ram_budget_gb:
        # Never pin more than the budget leaves after the components that are not streamed.
        comp = planner.on_host(planner.components_of(pipe, family.denoiser_names), device, unread)
        others = planner.others_on_host(planner.Plan("stream"), comp) + comp.process
        cap = max(0, host - others)
        settings = dataclasses.replace(settings or STREAM_SETTINGS, pinned_cap_bytes=cap)
        auto_notes.append(f"host RAM: at most {cap / 2**30:.1f} GiB pinned (host_ram_budget_gb {host / 2**30:.1f})")
    if unread and mode is not OffloadMode.STREAM:
        # Only the stream plan runs an encoder leaf by leaf from its files; the other placers need its weights.
        for n in unread:
            ENCODER_WEIGHTS.restore(getattr(pipe, n))
    elif unread:
        auto_notes.append(f"{', '.join(unread)}: not read at load; read from its files when a new prompt is encoded")
    offload_notes = apply_offload(pipe, mode, placement, family.denoiser_names, keep_on_cpu, settings)
    placement.notes = notes + auto_notes + offload_notes
    trim_host_heap()  # what loading and repacking freed goes back to the OS now, not after the first run
    return LoadedPipeline(pipe=pipe, family=family, options=options, device=device, notes=list(placement.notes),
                          placement=placement)


def _text_encoder_unread(options: LoadOptions, family: Any) -> bool:
    """Whether the text encoder is built without reading its weights: folder loads whose plan can be ``stream``
    (which then runs it leaf by leaf from its files), in 16-bit weights, with the encoder placed on the GPU."""
    return (family.text_encoder_unread_at_load and options.source is None
            and options.offload_mode in (OffloadMode.AUTO, OffloadMode.STREAM)
            and options.weight_dtype is not WeightDtype.FP8_E4M3FN and not options.text_encoder_on_cpu)


def _host_preplan(options: LoadOptions, family: Any, device: torch.device) -> planner.HostPreplan:
    """offload auto from a folder: plan host RAM from the safetensors headers before reading any weight, so a
    budget only fp8 storage fits reads fp8 directly, one only a single pinned expert fits leaves the second
    expert's blocks unread, and one nothing fits is refused before a long load."""
    none = planner.HostPreplan()
    if (options.offload_mode is not OffloadMode.AUTO or options.source is not None
            or options.weight_dtype is WeightDtype.FP8_E4M3FN or not family.loads_fp8_directly):
        return none
    try:
        comp = planner.components_from_folder(options.folder, family.denoiser_names)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return none  # a damaged folder: the load below says what is wrong with it
    if comp is None:
        return none
    unread = family.text_encoder_names if _text_encoder_unread(options, family) else ()
    return planner.host_preplan(planner.on_host(comp, device, unread), planner.host_budget(options.host_ram_budget_gb))


def _resolve_auto(pipe: Any, denoisers: tuple[str, ...], placement: Placement, weight_dtype: WeightDtype,
                  host_budget: int | None = None, fp8_only: bool = False, one_expert: bool = False,
                  unread: list[str] | None = None) -> tuple[OffloadMode, StreamSettings | None, list[str]]:
    """Ask the planner for a plan and turn it into a concrete mode (fp8 storage applied here when it asks)."""
    est = planner.plan_for_load(pipe, denoisers, placement.device, host_budget, fp8_only=fp8_only,
                                one_expert=one_expert, unread=unread or ())
    placement.plan = est
    plan = est.plan
    notes = [f"offload auto: {DESCRIPTIONS[OffloadMode.AUTO]}"]
    if plan.offload == "stream":
        return OffloadMode.STREAM, StreamSettings(fp8_linear=plan.fp8, cfg_batching=plan.cfg_batch), notes
    if plan.fp8 and weight_dtype is not WeightDtype.FP8_E4M3FN:
        # Sequential with fp8 storage: the family's precision-critical layers stay in compute precision. The
        # compute dtype is the loaded one: a model's first parameter can be an fp32 one (Wan's scale_shift_table),
        # and computing in fp32 then failed at the first bf16 layer.
        dens = [getattr(pipe, n, None) for n in denoisers]
        notes += apply_fp8_storage([(d, placement.fp8_skip) for d in dens], weight_dtype.compute_dtype)
    return OffloadMode(plan.offload), None, notes


def _drop(loaded: LoadedPipeline) -> None:
    """Let go of a pipeline's weights; the handle stays valid and reloads on next use."""
    if loaded.released:
        return
    try:
        loaded.placement.release()
    finally:
        loaded.pipe = None
        loaded.released = True


class PipelineCache:
    """Loaded pipelines by loader slot (the loader node's id)."""

    def __init__(self) -> None:
        self._slots: dict[str, LoadedPipeline] = {}
        self._generation = 0
        self._lock = threading.RLock()

    @property
    def generation(self) -> int:
        """Bumped whenever anything is released, so ComfyUI re-runs loaders instead of reusing stale handles."""
        return self._generation

    def get_or_load(
        self,
        slot: str,
        options: LoadOptions,
        device: torch.device,
        before_load: Callable[[], None] | None = None,
    ) -> tuple[LoadedPipeline, bool]:
        """The slot's pipeline for ``options`` and whether it was reused."""
        with self._lock:
            current = self._slots.get(slot)
            if current is not None and current.options == options and not current.released:
                return current, True
            if current is not None:
                self.release(slot)
            for other in self._slots.values():
                if other.options == options and not other.released and other.device == device:
                    self._slots[slot] = other
                    return other, True
            if before_load is not None:
                before_load()
            loaded = load_pipeline(options, device)
            self._slots[slot] = loaded
            return loaded, False

    def revive(self, loaded: LoadedPipeline, before_load: Callable[[], None] | None = None) -> LoadedPipeline:
        """Reload a released pipeline in place, so every handle that points at it works again."""
        with self._lock:
            if not loaded.released:
                return loaded
            if before_load is not None:
                before_load()
            fresh = load_pipeline(loaded.options, loaded.device)
            # The loader node's compile choice carries over to the new placement.
            if loaded.placement.compile_choice is not None:
                fresh.placement.set_compile(loaded.placement.compile_choice)
            loaded.pipe, loaded.notes, loaded.placement = fresh.pipe, fresh.notes, fresh.placement
            loaded.released = False
            return loaded

    def release(self, slot: str) -> int:
        """Release one slot's pipeline (unless another slot shares it); returns GPU bytes freed."""
        with self._lock:
            loaded = self._slots.pop(slot, None)
            if loaded is None or any(v is loaded for v in self._slots.values()):
                return 0
            return self._release_loaded([loaded])

    def release_all(self) -> int:
        with self._lock:
            unique = {id(v): v for v in self._slots.values()}
            self._slots.clear()
            return self._release_loaded(list(unique.values()))

    def _release_loaded(self, items: list[LoadedPipeline]) -> int:
        devices = {lp.device for lp in items}
        before = sum(allocated_bytes(d) for d in devices)
        for loaded in items:
            _drop(loaded)
        self._generation += 1
        for d in devices:
            release_memory(d)
        after = sum(allocated_bytes(d) for d in devices)
        return max(0, before - after)

    def __len__(self) -> int:
        return len({id(v) for v in self._slots.values()})


CACHE = PipelineCache()
