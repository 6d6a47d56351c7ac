"""Pick the fastest placement that fits: estimate peak VRAM and host RAM per plan, step down on out-of-memory.

Plans, fastest first (each later one needs less VRAM):
  none (everything resident) -> stream bf16 (CFG batched) -> stream fp8 -> stream fp8 with CFG passes one after
  the other -> sequential fp8. VAE tiling is the decode's own step-down (``decode.TilingMode.AUTO``).

The loader asks ``plan_for_load`` which plan to place for ``offload_mode`` auto and keeps the estimate on the
model's ``Placement``; the offload mechanisms never import this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch

from ..architectures import architecture_of
from ..device import host_available_bytes, is_oom
from ..errors import VramwiseError
from ..offload.components import components
from ..encoder_weights import ENCODER_WEIGHTS
from ..offload.stream import STREAM_OTHERS_ABOVE, repeated_blocks
from ..precision import module_bytes
from .estimates import (FIXED_OVERHEAD, PROCESS_HOST_BYTES, STREAMED_COMPONENT_PEAK, DenoiserShape, activation_bytes,
                        lean_activation_bytes, safetensors_tensors, token_merge_extra_bytes, tokens)

log = logging.getLogger(__name__)
T = TypeVar("T")
GiB = 2**30
DEFAULT_HEADROOM = int(1.0 * GiB)


@dataclass(frozen=True)
class Plan:
    offload: str  # an OffloadMode value
    fp8: bool = False
    cfg_batch: bool = True
    # Two experts of one block layout (Wan2.2 A14B) share one set of pinned block buffers: the expert not running
    # is re-read from its files when its turn comes (offload/expert_swap.py). Only the loader enters this plan,
    # because it decides what is read at load (the second expert's blocks are not).
    one_expert: bool = False

    def describe(self) -> str:
        parts = [self.offload, "fp8 storage" if self.fp8 else "bf16"]
        if self.offload == "stream":
            parts.append("CFG batched" if self.cfg_batch else "CFG sequential")
        if self.one_expert:
            parts.append("one expert pinned at a time")
        return ", ".join(parts)


PLANS: tuple[Plan, ...] = (
    Plan("none"),
    Plan("stream"),
    Plan("stream", fp8=True),
    Plan("stream", fp8=True, one_expert=True),
    Plan("stream", fp8=True, cfg_batch=False),
    Plan("sequential", fp8=True, cfg_batch=False),
)
ONE_EXPERT = next(i for i, p in enumerate(PLANS) if p.one_expert)


@dataclass(frozen=True)
class RunShape:
    latent_frames: int
    latent_height: int
    latent_width: int
    do_cfg: bool = True
    token_merge: bool = False  # a DiT token-merge patch is active (merged key/value groups, bigger attention)


# Wan defaults: 480x832, 81 frames -> latent 21 x 60 x 104 (for a denoiser without an architecture description)
DEFAULT_RUN = RunShape(21, 60, 104, True)


@dataclass(frozen=True)
class Components:
    """Weight bytes (compute dtype) of the pipeline's parts."""

    denoisers: tuple[DenoiserShape, ...]
    others: dict[str, int]  # text encoder, image encoder, VAE
    vae_decode_peak: int = 0
    # Host facts of where it runs (``on_host``): components the stream plan runs leaf by leaf from their files
    # (an unread UMT5 on CUDA: one leaf on the host at a time), and the bytes the process holds besides weights.
    from_files: frozenset[str] = frozenset()
    process: int = 0

    @property
    def denoiser_bytes(self) -> int:
        return sum(d.total_bytes for d in self.denoisers)

    @property
    def streamable(self) -> bool:
        """Stream plans need repeated blocks to stream; a UNet (I2VGen-XL) has none."""
        return bool(self.denoisers) and all(d.layers > 0 for d in self.denoisers)

    @property
    def experts_share_layout(self) -> bool:
        """Two denoisers whose blocks are the same shapes (Wan2.2 A14B's experts): one set of buffers serves both."""
        if len(self.denoisers) != 2:
            return False
        a, b = self.denoisers
        return a.layers == b.layers and a.block_bytes == b.block_bytes and a.layers > 0

    def allows(self, plan: "Plan") -> bool:
        if plan.one_expert and not self.experts_share_layout:
            return False
        return plan.offload != "stream" or self.streamable


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    vram_peak: int  # what must be free: the allocated peak plus allocator slack and CUDA context
    host_bytes: int
    pinned_bytes: int
    allocated_peak: int = 0  # what torch.cuda.max_memory_allocated should read (compared in bench/RESULTS.md)

    def describe(self) -> str:
        return (f"plan: {self.plan.describe()}; estimated peak VRAM {self.vram_peak / GiB:.1f} GiB, host RAM "
                f"{self.host_bytes / GiB:.1f} GiB ({self.pinned_bytes / GiB:.1f} GiB pinned)")


def estimate(plan: Plan, comp: Components, run: RunShape, compiled: bool = False) -> Estimate:
    batch = 2 if (run.do_cfg and plan.cfg_batch and plan.offload != "sequential") else 1
    d_peak = 0
    pinned = 0
    for i, d in enumerate(comp.denoisers):
        n = tokens(run.latent_frames, run.latent_height, run.latent_width, d.patch)
        act = activation_bytes(n, d.hidden, batch, compiled)
        if run.token_merge:
            act += token_merge_extra_bytes(n, d.hidden, batch, lean=False)
        if plan.offload == "none":
            weights = comp.denoiser_bytes  # both experts stay resident
            peak = weights + sum(comp.others.values()) + act
        elif plan.offload == "stream":
            # lean chunked forward: fp8 blocks stay fp8 in the slots, upcast one Linear at a time
            store = d.block_bytes // 2 if plan.fp8 else d.block_bytes
            slots = 2 * store + (d.block_bytes * 2 // 5 if plan.fp8 else 0)
            # The condition embedder (most of the non-block weights) is on the GPU only before the blocks run,
            # when the activations are still small; the blocks' phase holds the slots and the sequence tensors.
            blocks_phase = lean_activation_bytes(n, d.hidden, batch)
            if run.token_merge:
                blocks_phase += token_merge_extra_bytes(n, d.hidden, batch, lean=True)
            peak = max(d.non_block_bytes + slots, slots + blocks_phase)
            if not (plan.one_expert and i > 0):  # the second expert's blocks live in the first one's buffers
                pinned += store * d.layers
        elif plan.offload == "model":
            peak = d.total_bytes + act
        elif plan.offload == "group":
            peak = d.non_block_bytes + 2 * d.block_bytes + act
        else:  # sequential: one layer at a time
            peak = d.non_block_bytes // 4 + d.block_bytes // 8 + act
        d_peak = max(d_peak, peak)
    if plan.offload in ("stream", "sequential"):
        # big components (the UMT5-XXL text encoder) stream layer by layer in these plans
        encoders = max((min(v, STREAMED_COMPONENT_PEAK) for v in comp.others.values()), default=0)
    else:
        encoders = max(comp.others.values(), default=0)
    allocated = max(d_peak, encoders, comp.vae_decode_peak)
    denoisers_host = comp.denoiser_bytes
    if plan.one_expert and len(comp.denoisers) == 2:
        second = comp.denoisers[1]
        denoisers_host -= second.block_bytes * second.layers
    weights_host = denoisers_host // (2 if plan.fp8 else 1) + others_on_host(plan, comp) + comp.process
    return Estimate(plan, int(allocated + FIXED_OVERHEAD), int(weights_host), int(pinned), int(allocated))


def others_on_host(plan: Plan, comp: Components) -> int:
    """Host bytes of the non-denoiser components under ``plan``: a component read from its files leaf by leaf
    (stream plans) holds at most its largest leaf."""
    return sum(min(v, STREAMED_COMPONENT_PEAK) if plan.offload == "stream" and n in comp.from_files else v
               for n, v in comp.others.items())


def on_host(comp: Components, device: torch.device, unread: Iterable[str] = ()) -> Components:
    """``comp`` with the host facts of ``device``: on CUDA, the process's own bytes (PROCESS_HOST_BYTES) and the
    big encoders in ``unread`` that the stream plan reads from their files (offload.stream.place_stream streams
    components over STREAM_OTHERS_ABOVE leaf by leaf on CUDA only). On the CPU: ``comp`` unchanged."""
    if device.type != "cuda":
        return comp
    big = frozenset(n for n in unread if comp.others.get(n, 0) > STREAM_OTHERS_ABOVE)
    return replace(comp, from_files=big, process=PROCESS_HOST_BYTES)


class NothingFits(VramwiseError):
    pass


def token_merge_conflict(plan: Plan, comp: Components, run: RunShape, vram_budget: int,
                         compiled: bool = False) -> str | None:
    """Why token merging should sit out this run, or None to keep it.

    Merging is a speed option; it should never be what pushes a run off its plan (e.g. from stream to
    sequential, 5x slower) or out of memory. So when ``plan`` fits the budget without merging but not with it,
    the run goes without it, and this says why and how to get it back.
    """
    if not run.token_merge:
        return None
    merged = estimate(plan, comp, run, compiled)
    if merged.vram_peak <= vram_budget:
        return None
    plain = estimate(plan, comp, replace(run, token_merge=False), compiled)
    if plain.vram_peak > vram_budget:
        return None  # the plan has to change either way; merging is not what decides it
    return (f"token merge off for this run: with it the '{plan.describe()}' plan needs ~{merged.vram_peak / GiB:.1f} "
            f"GiB (budget {vram_budget / GiB:.1f} GiB), without it ~{plain.vram_peak / GiB:.1f} GiB. To merge, lower "
            f"num_frames or width/height, or raise vram_budget_gb.")


def choose(comp: Components, run: RunShape, vram_budget: int, host_budget: int, floor: int = 0,
           compiled: bool = False) -> Estimate:
    """The fastest plan from ``PLANS[floor:]`` whose estimate fits both budgets."""
    tried = []
    for plan in PLANS[floor:]:
        if not comp.allows(plan) or (plan.one_expert and floor != ONE_EXPERT):
            continue
        est = estimate(plan, comp, run, compiled)
        tried.append(est)
        if est.vram_peak <= vram_budget and est.host_bytes <= host_budget:
            return est
    smallest = tried[-1] if tried else estimate(PLANS[-1], comp, run, compiled)
    raise NothingFits(
        f"No offload plan fits: the safest ({smallest.plan.describe()}) needs ~{smallest.vram_peak / GiB:.1f} GiB "
        f"VRAM (budget {vram_budget / GiB:.1f} GiB) and {smallest.host_bytes / GiB:.1f} GiB host RAM (available "
        f"{host_budget / GiB:.1f} GiB). Fix: lower width/height or num_frames (VRAM grows with "
        f"frames x width x height), set cfg 1.0, text_encoder_on_cpu true, close other programs, or raise vram_budget_gb."
    )


# What the OS, ComfyUI and a browser keep when host_ram_budget_gb is 0 ("what is available").
DEFAULT_HOST_HEADROOM = int(2.0 * GiB)
# The smallest model the refusal can point to: Wan2.2 TI2V 5B with weight_dtype fp8_e4m3fn, from its published
# safetensors headers: transformer 10.0 GB bf16 -> 5.0 GB, UMT5-XXL 11.4 -> 6.2 GB (wo, norms, embeddings stay
# bf16), Wan2.2 VAE 1.4 GB.
TI2V_5B_HOST_FP8 = int(5.0e9 + 6.2e9 + 1.4e9)


def host_budget(budget_gb: float | None = None, held: int = 0, headroom: int = DEFAULT_HOST_HEADROOM) -> int:
    """Host RAM the model may hold: the user's budget, else MemAvailable minus a headroom. ``held``: bytes the
    model being planned already holds (it was loaded before planning, so MemAvailable no longer counts them)."""
    if budget_gb:
        return int(budget_gb * GiB)
    return max(0, host_available_bytes() + held - headroom)


def host_refusal(comp: Components, run: RunShape, budget: int, input_name: str = "host_ram_budget_gb") -> str:
    """Why no plan fits ``budget`` bytes of host RAM, naming what would: fp8 storage, a smaller model, more RAM."""
    by_plan = {}
    for plan in PLANS:
        if comp.allows(plan) and not plan.one_expert:
            by_plan.setdefault(plan.fp8, estimate(plan, comp, run).host_bytes)
    one = estimate(PLANS[ONE_EXPERT], comp, run).host_bytes if comp.allows(PLANS[ONE_EXPERT]) else None
    bf16, fp8 = by_plan.get(False), by_plan.get(True)
    need = min(v for v in list(by_plan.values()) + [one] if v is not None)
    parts = [f"the model needs ~{need / GiB:.1f} GiB of host RAM at the least"]
    if bf16 is not None and fp8 is not None:
        parts = [f"the model needs ~{bf16 / GiB:.1f} GiB of host RAM in bf16 and ~{fp8 / GiB:.1f} GiB with fp8 storage"]
        if one is not None:
            parts[0] += f" (~{one / GiB:.1f} GiB with one expert pinned at a time)"
    fixes = []
    if fp8 is not None and fp8 <= budget:
        fixes.append("weight_dtype fp8_e4m3fn (or offload_mode auto, which picks it)")
    fixes.append(f"a smaller model (Wan2.2 TI2V 5B needs ~{TI2V_5B_HOST_FP8 / GiB:.0f} GiB with weight_dtype "
                 "fp8_e4m3fn)")
    fixes.append(f"more RAM: raise {input_name} to at least {need / GiB:.1f} (0 = what the system has available), "
                 "or close other programs")
    return f"{parts[0]}, but the host RAM budget is {budget / GiB:.1f} GiB. Fix: " + "; or ".join(fixes) + "."


def vram_budget(device: torch.device, budget_gb: float | None = None, headroom_gb: float | None = None) -> int:
    """Usable VRAM: the user's budget, else free memory minus a headroom."""
    from ..device import free_bytes

    if budget_gb:
        return int(budget_gb * GiB)
    headroom = int(headroom_gb * GiB) if headroom_gb is not None else DEFAULT_HEADROOM
    return max(0, free_bytes(device) - headroom)


# ---- plan floors (raised by out-of-memory retries) ------------------------------------------------------------
_FLOORS: dict[str, int] = {}


def floor_for(key: str) -> int:
    return _FLOORS.get(key, 0)


def set_floor(key: str, plan: Plan) -> None:
    _FLOORS[key] = max(_FLOORS.get(key, 0), PLANS.index(plan))


def clear_floors() -> None:
    _FLOORS.clear()


def next_plan(plan: Plan) -> Plan | None:
    """The next safer plan; never into the one-expert plan (only a load can enter it, see Plan.one_expert)."""
    later = [p for p in PLANS[PLANS.index(plan) + 1:] if not p.one_expert]
    return later[0] if later else None


def run_with_step_down(
    attempt: Callable[[], T],
    current_plan: Callable[[], Plan],
    step_down: Callable[[Plan], None],
    free_all: Callable[[], None],
    report: list[str] | None = None,
) -> T:
    """Run ``attempt``; on CUDA out-of-memory free everything, move to the next safer plan and try again.

    ``step_down(plan)`` re-places the model for ``plan``; when the safest plan also runs out of memory the error
    says so and what would fit.
    """
    while True:
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - only OOM is handled
            if not is_oom(e):
                raise
            plan = current_plan()
            free_all()
            nxt = next_plan(plan)
            msg = f"out of memory with plan '{plan.describe()}'"
            if nxt is None:
                raise NothingFits(
                    f"{msg}, the safest plan. Fix: lower width/height or num_frames, set cfg 1.0, or close programs "
                    "that use the GPU."
                ) from e
            if report is not None:
                report.append(f"{msg}; retried with '{nxt.describe()}'")
            log.warning("%s; stepping down to %s", msg, nxt.describe())
            step_down(nxt)


# ---- components of a loaded pipeline ---------------------------------------------------------------------------
def components_of(pipe: Any, denoiser_names: Iterable[str]) -> Components:
    """Weight bytes of a loaded pipeline's parts; a text encoder released or not read yet (encoder_weights)
    counts with what it holds once read."""
    dens = []
    others = {}
    denoiser_names = set(denoiser_names)
    for name, module in components(pipe):
        if name in denoiser_names:
            dens.append(DenoiserShape.from_module(module, repeated_blocks(module)))
        else:
            others[name] = module_bytes(module) + ENCODER_WEIGHTS.released_bytes(module)
    vae_peak = 0
    return Components(tuple(dens), others, vae_peak)


def default_run_for(pipe: Any, denoiser_names: Iterable[str] = ("transformer",)) -> RunShape:
    """The run a plan is sized for at load time: the first denoiser's architecture default (the real request
    is checked again when it comes, in ``planned_run``)."""
    for name in denoiser_names:
        arch = architecture_of(getattr(pipe, name, None))
        if arch is not None:
            return RunShape(*arch.default_latent, True)
    return DEFAULT_RUN


def components_from_folder(folder: Path, denoiser_names: Iterable[str]) -> Components | None:
    """The components of a diffusers pipeline folder from its configs and safetensors headers, no weights read:
    what ``components_of`` would give once loaded in a 16-bit compute dtype. None when a denoiser has no config."""
    folder = Path(folder)
    dens, others = [], {}
    names = set(denoiser_names)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            continue
        cls = _diffusers_class(folder, sub.name)
        keep32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
        # As weight_loading reads them: 2 bytes per element whatever the file stores (fp32 / fp8 files load in the
        # 16-bit compute dtype), 4 in the modules the class keeps in fp32.
        stored = {name: numel for st in files for name, (numel, _) in safetensors_tensors(st).items()}
        total = sum(n * (4 if any(m in name.split(".") for m in keep32) else 2) for name, n in stored.items())
        if sub.name in names:
            total += _built_buffer_bytes(cls, sub, set(stored))
            cfg_path = sub / "config.json"
            if not cfg_path.is_file():
                return None
            with open(cfg_path, encoding="utf-8") as f:
                dens.append(DenoiserShape.from_config(json.load(f), total))
        else:
            others[sub.name] = total
    return Components(tuple(dens), others) if dens else None


def _diffusers_class(folder: Path, component: str) -> Any:
    """The component's diffusers class from model_index.json; None for other libraries' classes (transformers'
    encoders, which load in the compute dtype) or an unreadable index."""
    try:
        with open(folder / "model_index.json", encoding="utf-8") as f:
            entry = json.load(f).get(component)
        import diffusers

        return getattr(diffusers, entry[1], None) if isinstance(entry, list) and len(entry) == 2 else None
    except (OSError, ValueError, TypeError):
        return None


def _built_buffer_bytes(cls: Any, folder: Path, stored: set[str]) -> int:
    """Buffers the model computes when it is built and no file holds (Wan's rotary tables: ~1 MB at 14B, most of
    a tiny test model): the skeleton is built with empty weights, as the loader builds it."""
    if cls is None:
        return 0
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(folder))
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in stored)


@dataclass(frozen=True)
class HostPreplan:
    """What the host budget decides before any weight is read (offload auto, from the folder's headers)."""

    fp8: bool = False  # only fp8-storage plans fit: read the denoisers straight into fp8
    one_expert: bool = False  # only the one-expert plan fits: leave the second expert's blocks unread


def host_preplan(comp: Components, host_budget_bytes: int) -> HostPreplan:
    """Before loading (offload auto): whether only fp8-storage plans fit the host budget, so the loader reads the
    denoiser weights straight into fp8 instead of holding bf16 first (32.8 GB for Wan2.1 14B, over a 32 GiB
    machine before the planner could pick fp8), and whether only one expert of two fits pinned. Refuses, naming
    what would fit, when no plan fits at all."""
    from ..errors import InputError

    fits = [p for p in PLANS if comp.allows(p) and estimate(p, comp, DEFAULT_RUN).host_bytes <= host_budget_bytes]
    if not fits:
        text = host_refusal(comp, DEFAULT_RUN, host_budget_bytes)
        raise InputError("host_ram_budget_gb", text.split(". Fix: ")[0] + ".", text.split(". Fix: ")[1])
    return HostPreplan(fp8=all(p.fp8 for p in fits), one_expert=all(p.one_expert for p in fits))


def plan_for_load(pipe: Any, denoiser_names: Iterable[str], device: torch.device,
                  host_budget_bytes: int | None = None, fp8_only: bool = False,
                  one_expert: bool = False, unread: Iterable[str] = ()) -> Estimate:
    """OffloadMode.AUTO: the plan for the default run size and the free memory now (raised by OOM floors).

    Host RAM is a hard limit (pinned memory cannot be swapped out; running past it crashes the machine): when no
    plan fits ``host_budget_bytes`` this raises an InputError naming what would. VRAM is re-checked per run.
    ``fp8_only``: the denoisers were read into fp8 already (``host_preplan``), so only fp8 plans apply;
    ``one_expert``: the second expert's blocks were left unread, so the one-expert plan (or a safer one) applies;
    ``unread``: text encoders not read at load (``on_host``).
    """
    from ..errors import InputError

    denoisers = tuple(denoiser_names)
    comp = on_host(components_of(pipe, denoisers), device, unread)
    floor = floor_for(key_of(pipe))
    if fp8_only:
        floor = max(floor, next(i for i, p in enumerate(PLANS) if p.fp8))
    if one_expert:
        floor = max(floor, ONE_EXPERT)
    run = default_run_for(pipe, denoisers)
    host = host_budget_bytes if host_budget_bytes is not None else host_budget(held=held_bytes(pipe, denoisers))
    fits_host = [p for p in PLANS[floor:] if comp.allows(p) and estimate(p, comp, run).host_bytes <= host
                 and (not p.one_expert or floor == ONE_EXPERT)]
    if not fits_host:
        raise InputError("host_ram_budget_gb", host_refusal(comp, run, host).split(". Fix: ")[0] + ".",
                         host_refusal(comp, run, host).split(". Fix: ")[1])
    if device.type != "cuda":
        # CPU: exercise the first offloading plan the model allows (stream where it has repeated blocks)
        plan = next((p for p in fits_host if p.offload != "none"), fits_host[0])
        return estimate(plan, comp, run)
    try:
        return choose(comp, run, vram_budget(device), host, floor)
    except NothingFits:
        return estimate(fits_host[-1], comp, run)


def comp_bytes(comp: Components) -> int:
    return comp.denoiser_bytes + sum(comp.others.values())


def held_bytes(pipe: Any, denoiser_names: Iterable[str]) -> int:
    """What a loaded pipeline holds now (``components_of`` less the encoders released or not read yet): the bytes
    MemAvailable no longer counts."""
    comp = components_of(pipe, denoiser_names)
    return comp_bytes(comp) - sum(ENCODER_WEIGHTS.released_bytes(m) for _, m in components(pipe))


def key_of(pipe: Any) -> str:
    return str(getattr(pipe, "name_or_path", "") or id(pipe))


__all__ = ["Plan", "PLANS", "RunShape", "Components", "Estimate", "estimate", "choose", "NothingFits",
           "token_merge_conflict", "plan_for_load", "components_from_folder", "host_preplan", "HostPreplan", "host_budget", "host_refusal", "components_of", "key_of",
           "on_host", "others_on_host", "held_bytes",
           "run_with_step_down", "vram_budget", "set_floor", "floor_for", "next_plan", "replace"]
