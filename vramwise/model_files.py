"""Model files a node input may open: only names the input's own listing offers.

ComfyUI 0.3.75 does not check a V3 combo value against its options, so a queued prompt can carry any string
(``/etc/passwd``, ``../../x.safetensors``). Every file input resolves its value here: a name is accepted only if it
is one of the files listed under the input's roots (symlinks followed, so a file linked in from another disk
works), and anything else gets one fixed message, whether or not that path exists, so errors cannot be used to
probe the machine's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .errors import InputError
from .folder_walk import walk_once


def list_model_files(roots: Iterable[Path], extensions: tuple[str, ...]) -> list[str]:
    """Files ending in one of ``extensions`` under every root, as '/'-separated names relative to their root."""
    found: set[str] = set()
    suffixes = tuple(e.lower() for e in extensions)
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, _dirs, files in walk_once(root):
            rel = current.relative_to(root)
            for f in files:
                if f.lower().endswith(suffixes) and (current / f).is_file():
                    found.add((rel / f).as_posix())
    return sorted(found)


def resolve_model_file(input_name: str, name: str, roots: Iterable[Path], extensions: tuple[str, ...], folder_hint: str) -> Path:
    """The path of ``name`` if it is one of ``list_model_files(roots, extensions)``, else an InputError.

    ``folder_hint`` is the folder shown in the fix (e.g. ``models/vae``). The message never depends on whether the
    submitted path exists.
    """
    roots = [Path(r) for r in roots]
    if isinstance(name, str) and name and name in list_model_files(roots, extensions):
        for root in roots:
            candidate = root / name
            if candidate.is_file():
                return candidate
    raise InputError(
        input_name,
        "the value is not one of the files listed for this input.",
        f"pick a file from the list (put new files in {folder_hint} and press R to refresh the list).",
    )
