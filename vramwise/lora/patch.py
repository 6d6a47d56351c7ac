"""``LoraPatch``: the ModelPatch that applies one or more LoRA files during a sampling run only.

The stored weights are never modified or copied, so changing a strength or removing the LoRA node costs nothing:
the next run simply attaches different terms (no model reload, no re-read of the LoRA file: ``convert.read_lora``
keeps the converted tensors). Chained LoRA nodes add entries to ONE patch (patches replace each other by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import InputError
from .apply import LoraTerm
from .convert import read_lora
from .match import LoraMatch, match_lora
from .placement import apply_for_run

if TYPE_CHECKING:
    from ..handles import RunInfo, VramwiseModel

PATCH_NAME = "lora"
# Wan2.2 A14B: ``transformer`` denoises the high-noise steps, ``transformer_2`` the low-noise ones.
LOW_NOISE_DENOISER = "transformer_2"


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA node's contribution: a file and its strength per expert."""

    path: Path
    strength: float = 1.0
    strength_low_noise: float = 1.0  # Wan2.2 A14B's low-noise expert (transformer_2); unused elsewhere

    def strength_for(self, denoiser_name: str) -> float:
        return self.strength_low_noise if denoiser_name == LOW_NOISE_DENOISER else self.strength


def _describe_match(entry: LoraEntry, denoiser_name: str, m: LoraMatch) -> str:
    text = (f"LoRA '{entry.path.name}' ({m.lora.layout}) x{entry.strength_for(denoiser_name):g} on {denoiser_name}: "
            f"{m.matched_keys} of {m.total_keys} keys applied to {len(m.layers)} layers")
    if m.ignored_keys:
        why = []
        if m.lora.ignored_keys:
            ex = ", ".join(m.lora.ignored_examples[:2])
            why.append(f"{m.lora.ignored_keys} not applied by diffusers' conversion" + (f" (e.g. {ex})" if ex else ""))
        if m.unmatched:
            why.append(f"{len(m.unmatched)} layers not in this model")
        if m.wrong_shape:
            why.append(f"{len(m.wrong_shape)} layers of another shape")
        text += f"; {m.ignored_keys} ignored: " + "; ".join(why)
    return text


def check_match(entry: LoraEntry, denoiser_name: str, m: LoraMatch, model_label: str) -> None:
    """Zero layers that fit = a LoRA for another model: fail naming the file and what matched."""
    if m.layers:
        return
    raise InputError(
        "lora_name",
        f"'{entry.path.name}' does not fit {model_label} ({denoiser_name}): 0 of {m.total_keys} keys matched "
        f"({len(m.unmatched)} layers not in this model, {len(m.wrong_shape)} of another shape).",
        "pick a LoRA trained for this model (Wan2.1 14B LoRAs need a 14B model, a 1.3B LoRA does not fit).",
    )


def check_family(family) -> None:
    """LoRA needs a conversion from the files users have to diffusers' module names; diffusers 0.42 has one for
    Wan only (none for EasyAnimate or I2VGen-XL)."""
    if not family.id.startswith("wan"):
        raise InputError(
            "model", f"LoRA is not supported for {family.label}: diffusers has no LoRA conversion for it.",
            "use a Wan model with this LoRA node, or remove the node.")


@dataclass(eq=False)
class LoraPatch:
    """All LoRA entries of a model handle; see the module docstring."""

    entries: tuple[LoraEntry, ...] = ()
    name: str = PATCH_NAME
    report: list[str] = field(default_factory=list, repr=False, compare=False)

    def with_entry(self, entry: LoraEntry) -> "LoraPatch":
        """A new patch with ``entry`` added after this one's (the original stays as it is)."""
        return replace(self, entries=self.entries + (entry,), report=[])

    # ---- matching ------------------------------------------------------------------------------------------------
    def plan(self, model: "VramwiseModel") -> tuple[dict[str, dict[torch.nn.Module, list[LoraTerm]]], list[str]]:
        """Per denoiser name, the target modules and their terms (zero strengths left out), plus a line per match.

        Raises InputError for a file that fits nothing."""
        loaded = model.loaded
        check_family(loaded.family)
        pipe = loaded.pipe
        names = [n for n in loaded.family.denoiser_names if getattr(pipe, n, None) is not None]
        plans: dict[str, dict[torch.nn.Module, list[LoraTerm]]] = {n: {} for n in names}
        lines: list[str] = []
        from ..parallel.proxy import ParallelDenoiser

        if any(isinstance(getattr(pipe, n), ParallelDenoiser) for n in names):
            # The weights live in the worker processes; nothing here could carry the LoRA to them.
            raise InputError("model", "LoRA does not reach denoisers that run on several GPUs (worker processes).",
                             "load the model on one GPU for LoRA, or remove the LoRA node.")
        for entry in self.entries:
            lora = read_lora(entry.path)
            for n in names:
                denoiser = getattr(pipe, n)
                m = match_lora(denoiser, lora)
                check_match(entry, n, m, loaded.family.label)
                lines.append(_describe_match(entry, n, m))
                strength = entry.strength_for(n)
                if strength == 0.0:
                    continue
                modules = dict(denoiser.named_modules())
                for mod_name, layer in m.layers.items():
                    plans[n].setdefault(modules[mod_name], []).append(LoraTerm(layer, float(strength)))
        return plans, lines

    def validate(self, model: "VramwiseModel") -> list[str]:
        """Match every entry now (the LoRA node calls this so a wrong file fails at the node); the report lines."""
        check_family(model.family)
        if model.loaded.pipe is None:
            return []
        return self.plan(model)[1]

    # ---- ModelPatch ----------------------------------------------------------------------------------------------
    def attach(self, model: "VramwiseModel", run: "RunInfo") -> Callable[[], None]:
        plans, lines = self.plan(model)
        if not any(plans.values()):
            self.report[:] = lines + ["LoRA: every strength is 0, nothing applied"]
            return lambda: None
        detach, notes = apply_for_run(model.loaded, plans)
        self.report[:] = lines + notes
        return detach

    def on_step(self, step: int, total: int) -> None:
        pass

    def describe(self) -> str:
        if self.report:
            return "\n".join(self.report)
        return "\n".join(f"LoRA '{e.path.name}' x{e.strength:g}" + (
            f" (low-noise x{e.strength_low_noise:g})" if e.strength_low_noise != e.strength else "")
            for e in self.entries)


def with_lora(model: "VramwiseModel", entry: LoraEntry) -> "VramwiseModel":
    """A clone of ``model`` that also applies ``entry``: chained LoRA nodes merge into the one LoRA patch."""
    current = next((p for p in model.patches if isinstance(p, LoraPatch)), None)
    patch = current.with_entry(entry) if current is not None else LoraPatch((entry,))
    return model.with_patch(patch)
