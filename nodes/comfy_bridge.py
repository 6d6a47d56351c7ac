"""The pack's only door into ComfyUI: every import of comfy_api, comfy.* and folder_paths lives here.

Node modules import ComfyUI's V3 schema classes and the few services they need (devices, interrupt, progress,
folders) from this file, so the engine in ``vramwise/`` stays testable without a server and a ComfyUI upgrade
touches one file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_management as model_management
import comfy.utils
import folder_paths
import torch
from comfy.cli_args import LatentPreviewMethod, args
from comfy_api.latest import ComfyExtension, InputImpl, Types, io, ui

from ..vramwise.model_files import list_model_files, resolve_model_file

__all__ = ["ComfyExtension", "InputImpl", "Types", "io", "ui"]

DIFFUSERS_FOLDER = "diffusers"


def torch_device() -> torch.device:
    """The device ComfyUI computes on (honours --cpu, --cuda-device and friends)."""
    return model_management.get_torch_device()


def free_comfyui_models() -> None:
    """Ask ComfyUI to unload its own models so ours and its don't fight over VRAM."""
    model_management.unload_all_models()
    model_management.soft_empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    model_management.throw_exception_if_processing_interrupted()


def diffusers_roots() -> list[Path]:
    """models/diffusers plus any folders added through extra_model_paths.yaml."""
    return [Path(p) for p in folder_paths.get_folder_paths(DIFFUSERS_FOLDER)]


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


def temp_directory() -> Path:
    return Path(folder_paths.get_temp_directory())


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def metadata_disabled() -> bool:
    """True when ComfyUI was started with --disable-metadata."""
    return bool(args.disable_metadata)


def previews_enabled() -> bool:
    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_max_size() -> int:
    return int(args.preview_size)


def latent_rgb_factors(format_name: str | None) -> tuple[list[list[float]], list[float] | None] | None:
    """ComfyUI's linear latent-to-RGB approximation for a latent format, if it has one."""
    if not format_name:
        return None
    cls = getattr(comfy.latent_formats, format_name, None)
    if cls is None:
        return None
    # Some formats (SD15) set their factors in __init__, others as class attributes: ask an instance.
    fmt = cls()
    factors = getattr(fmt, "latent_rgb_factors", None)
    if factors is None:
        return None
    return factors, getattr(fmt, "latent_rgb_factors_bias", None)


class Progress:
    """A ComfyUI progress bar for the executing node; each update also honours Cancel."""

    def __init__(self, total: int) -> None:
        self._bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, total: int, preview: Any | None = None) -> None:
        payload = ("JPEG", preview, preview_max_size()) if preview is not None else None
        self._bar.update_absolute(value, total, payload)


def is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, model_management.InterruptProcessingException)


def environment_name() -> str:
    """Short description of the compute device, for node info text."""
    device = torch_device()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)


def relative_to_output(path: Path) -> tuple[str, str]:
    """(subfolder, filename) of a file under the output or temp folder, as ComfyUI's /view expects."""
    for base in (output_directory(), temp_directory()):
        try:
            rel = Path(path).resolve().relative_to(base.resolve())
        except ValueError:
            continue
        return (str(rel.parent) if str(rel.parent) != "." else "", rel.name)
    return "", os.path.basename(path)


# --- model files by ComfyUI folder name (VRAMWiseCheckpointLoader, and every other file input) ---
def folder_roots(folder_name: str) -> list[Path]:
    """Every path registered for a ComfyUI model folder name (models/<name> plus extra_model_paths.yaml)."""
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(folder_name)]
    except KeyError:
        return []


def list_files(folder_name: str, extensions: tuple[str, ...] = (".safetensors",)) -> list[str]:
    """Files under every path registered for ``folder_name`` (relative names, '/'-separated), read fresh each call
    so files added while the server runs show up without a restart."""
    return list_model_files(folder_roots(folder_name), extensions)


def model_file(input_name: str, folder_name: str, name: str, extensions: tuple[str, ...] = (".safetensors",)) -> Path:
    """The path of a file input's value, only if ``list_files(folder_name, extensions)`` lists it; otherwise one
    fixed InputError naming ``input_name`` (see vramwise/model_files.py). Every file input goes through this."""
    return resolve_model_file(input_name, name, folder_roots(folder_name), extensions, f"models/{folder_name}")
