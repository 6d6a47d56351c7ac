"""The values that travel between nodes: a loaded model and sampled latents.

They are plain data so that ComfyUI can cache them between prompts; the heavy pipeline object is shared, never
copied, between a model handle and its patched clones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .offload.placement import Placement


class ModelFamily(Protocol):
    """What a handle needs of its model family. ``families.base.Family`` provides it; the families import this
    module (for ``LoadedPipeline`` and ``RunInfo``), so it names the family by this protocol and imports nothing of
    theirs, not even for type checking: the import graph of ``vramwise`` has no cycle at all."""

    id: str
    label: str
    denoiser_names: tuple[str, ...]


@dataclass(frozen=True)
class LoadOptions:
    """What a loader node asked for; equal options reuse the loaded pipeline (``loader.PipelineCache``)."""

    folder: Path
    # offload.OffloadMode and precision.WeightDtype; not imported here because the offload package reaches
    # this module through token merge's patch (a cycle through annotations, which test_structure forbids).
    offload_mode: Any
    weight_dtype: Any
    text_encoder_on_cpu: bool = False
    # Optional non-folder source (e.g. single_file.SingleFileSpec): ``family()`` and
    # ``load(torch_dtype, keep_fp8=...)``; ``folder`` then names its main file in notes and errors.
    source: Any = None
    # Host RAM the model may hold (GiB); 0 = what the OS reports available minus a headroom (planner.host_budget).
    host_ram_budget_gb: float = 0.0


@dataclass(frozen=True)
class RunInfo:
    """What a model patch needs to know about the run it is attached to."""

    width: int
    height: int
    num_frames: int
    steps: int
    latent_frames: int
    latent_height: int
    latent_width: int
    do_cfg: bool


class ModelPatch(Protocol):
    """A change applied to the shared pipeline for the duration of one sampling run only.

    ``attach`` returns a function that undoes exactly what it did, so the cached pipeline is never left patched
    (bypassing or deleting the patch node must give the unpatched output again).
    """

    name: str

    def attach(self, model: "VramwiseModel", run: RunInfo) -> Callable[[], None]: ...

    def on_step(self, step: int, total: int) -> None: ...


def patch_note(patch: ModelPatch) -> str:
    """The line a patch adds to the sampler's ``info``: its ``run_note()`` (what the last run did) if it has one,
    else its name."""
    run_note = getattr(patch, "run_note", None)
    return run_note() if callable(run_note) else patch.name


@dataclass
class LoadedPipeline:
    """One diffusers pipeline with the offload/precision plan that was applied to it.

    ``placement`` owns everything this pack did to place ``pipe`` (plan, stream engines, CFG batchers, compile
    choice, weight patchers); ``placement.release()`` moves what the offload mode lets go of back off the GPU and
    is called after every run and on errors. A reload (``PipelineCache.revive``) replaces it.
    """

    pipe: Any
    family: ModelFamily
    options: LoadOptions
    device: torch.device
    notes: list[str] = field(default_factory=list)
    released: bool = False
    placement: Placement = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.placement is None:
            self.placement = Placement(self.device)

    @property
    def text_device(self) -> torch.device:
        return torch.device("cpu") if self.options.text_encoder_on_cpu else self.device

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.family.denoiser_names if getattr(self.pipe, n, None) is not None]


@dataclass(frozen=True)
class VramwiseModel:
    """The VRAMWISE_MODEL socket value: a loaded pipeline plus the patches to apply when sampling."""

    loaded: LoadedPipeline
    patches: tuple[ModelPatch, ...] = ()

    @property
    def family(self) -> ModelFamily:
        return self.loaded.family

    def with_patch(self, patch: ModelPatch) -> "VramwiseModel":
        """A clone that also applies ``patch``; the original handle is untouched."""
        kept = tuple(p for p in self.patches if p.name != patch.name)
        return replace(self, patches=kept + (patch,))


@dataclass(frozen=True)
class VramwiseLatent:
    """The VRAMWISE_LATENT socket value: denoised latents (normalised, on CPU) and how to turn them into frames."""

    samples: torch.Tensor
    family_id: str
    width: int
    height: int
    num_frames: int
    fps: float
    info: str = ""
