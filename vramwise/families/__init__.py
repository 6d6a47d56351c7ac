"""Recognise a diffusers folder's model family.

Order matters: more specific families (two experts, expanded timesteps) are tried before the general ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import ModelFolderError
from .base import Family, FamilyDefaults, GenerationRequest, ModelIndex
from .easyanimate import EASYANIMATE_FAMILIES, legacy_layout_reason
from .i2vgenxl import I2VGENXL_FAMILIES
from .wan import WAN_FAMILIES, text_to_video_reason

FAMILY_CLASSES: list[type[Family]] = [*WAN_FAMILIES, *EASYANIMATE_FAMILIES, *I2VGENXL_FAMILIES]

# Pipelines we recognise but cannot run, with the reason a user should read.
KNOWN_UNSUPPORTED: dict[str, str] = {
    "WanPipeline": "a Wan text-to-video model; this pack needs an image-to-video (I2V/FLF2V/TI2V) model",
    "WanVACEPipeline": "a Wan VACE model; it is not supported yet",
    "EasyAnimatePipeline": "an EasyAnimate text-to-video model; this pack needs the V5.1 InP (image-to-video) model",
    "EasyAnimateControlPipeline": "an EasyAnimate control-to-video model; this pack needs the V5.1 InP (image-to-video) model",
}

# Checks for folders whose pipeline class a family runs but whose layout it cannot load: each returns the reason
# a user should read, or None. They run before any family is matched.
LAYOUT_REFUSALS: list[Callable[[ModelIndex], str | None]] = [legacy_layout_reason, text_to_video_reason]


def register_family(cls: type[Family], first: bool = True) -> None:
    """Add a family; ``first`` puts it ahead of the general ones so specific layouts win."""
    if cls not in FAMILY_CLASSES:
        FAMILY_CLASSES.insert(0, cls) if first else FAMILY_CLASSES.append(cls)


def family_by_id(family_id: str) -> Family:
    for cls in FAMILY_CLASSES:
        if cls.id == family_id:
            return cls()
    known = ", ".join(c.id for c in FAMILY_CLASSES)
    raise ModelFolderError(f"Unknown model family '{family_id}'. Known families: {known}.")


def missing_component_reason(index: ModelIndex, family: Family) -> str | None:
    """What a matched folder lacks for its pipeline, in words, or None.

    diffusers would only say "Pipeline ... expected {...}, but only {...} were passed" or name a weights file it
    could not find, deep in a traceback; the user needs the component's name and that the download is incomplete.
    The components a pipeline needs come from diffusers itself (``_get_signature_keys`` minus its
    ``_optional_components``), plus the denoisers and text encoders the family runs.
    """
    import diffusers

    pipeline_cls = getattr(diffusers, family.pipeline_class_name, None)
    needed: set[str] = set(family.denoiser_names) | set(family.text_encoder_names)
    if pipeline_cls is not None:
        expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
        needed |= set(expected) - set(getattr(pipeline_cls, "_optional_components", ()))
    absent = sorted(n for n in needed if not index.has_component(n))
    if absent:
        names = ", ".join(f"'{n}'" for n in absent)
        return (f"model_index.json has no {names} component, which {family.label} needs. Fix: download the whole "
                "folder again (or restore model_index.json from the published model).")
    no_folder = sorted(n for n in index.components() if not (index.folder / n).is_dir())
    if no_folder:
        names = ", ".join(f"'{n}'" for n in no_folder)
        return (f"model_index.json lists the component {names} but the folder has no such sub-folder. Fix: download "
                "the missing sub-folder (or the whole model folder) again.")
    return None


def detect_family(folder: Path) -> Family:
    """The family of a diffusers folder, or a ModelFolderError saying what was found instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder '{folder}' does not exist.")
    if not (folder / "model_index.json").is_file():
        raise ModelFolderError(
            f"'{folder}' has no model_index.json, so it is not a diffusers pipeline folder. "
            "Put the whole diffusers folder (with model_index.json and one sub-folder per component) there."
        )
    try:
        index = ModelIndex.read(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"'{folder}/model_index.json' is not valid JSON ({e}); the download is corrupt.") from e
    for refusal in LAYOUT_REFUSALS:
        reason = refusal(index)
        if reason:
            raise ModelFolderError(f"'{folder.name}' holds {reason}.")
    for cls in FAMILY_CLASSES:
        if cls.matches(index):
            family = cls()
            missing = missing_component_reason(index, family)
            if missing:
                raise ModelFolderError(f"'{folder.name}' is incomplete: {missing}")
            return family
    found = index.pipeline_class or "no _class_name"
    reason = KNOWN_UNSUPPORTED.get(index.pipeline_class)
    components = ", ".join(index.components()) or "none"
    supported = "; ".join(c.label for c in FAMILY_CLASSES)
    what = f"{found} ({reason})" if reason else found
    raise ModelFolderError(
        f"'{folder.name}' holds {what} with components [{components}], which this pack cannot run. "
        f"Supported: {supported}."
    )


__all__ = [
    "Family",
    "FamilyDefaults",
    "GenerationRequest",
    "ModelIndex",
    "FAMILY_CLASSES",
    "LAYOUT_REFUSALS",
    "detect_family",
    "family_by_id",
    "register_family",
]
