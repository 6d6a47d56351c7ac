"""Find diffusers model folders (any folder holding model_index.json) under the model roots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import ModelFolderError
from .folder_walk import walk_once

MAX_DEPTH = 4


def _is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def list_model_folders(roots: Iterable[Path]) -> list[str]:
    """Folder names relative to their root, '/'-separated, sorted; a folder's own sub-folders are not searched.

    A model folder linked under two names is listed under both (each name is a deliberate choice and saved
    workflows may use either); a symlink loop is not followed (folder_walk), so nothing is listed twice through it.
    """
    found: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, dirs, files in walk_once(root, max_depth=MAX_DEPTH, leaf=_is_model_folder):
            rel = current.relative_to(root)
            if "model_index.json" in files and rel != Path("."):
                found.add(rel.as_posix())
                dirs.clear()
    return sorted(found, key=str.lower)


def resolve_model_folder(name: str, roots: Iterable[Path]) -> Path:
    """The folder ``name`` under one of ``roots``; refuses names that escape a root.

    The name is checked before symlinks are followed (users often link model folders from other disks), and only
    names the listing offers are accepted: ComfyUI does not check combo values against their options.
    """
    roots = [Path(r) for r in roots]
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise ModelFolderError(f"model: '{name}' must be a folder name under models/diffusers, not a path.")
    if name in list_model_folders(roots):
        for root in roots:
            candidate = root / name
            if (candidate / "model_index.json").is_file():
                return candidate
    searched = ", ".join(str(r) for r in roots) or "no folders"
    raise ModelFolderError(
        f"model: '{name}' was not found (searched {searched}). Fix: put the whole diffusers folder (with "
        "model_index.json) under models/diffusers, then refresh the node list (press R) and pick it."
    )
