"""Walk model roots following symlinks (users link models from other disks) without walking any real folder twice.

``os.walk(followlinks=True)`` re-enters a symlink loop (``models/diffusers/loop -> ..``) until its depth limit and
lists every model again under the loop's path; it has no loop detection of its own, so we keep the real paths of
the folders already walked and skip a folder that resolves to one of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator


def walk_once(
    root: Path, max_depth: int | None = None, leaf: Callable[[str], bool] | None = None
) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` of ``root`` (top-down, symlinks followed) yielding (folder, sub-folders, files); each real folder
    is entered once. Callers may prune the yielded sub-folder list in place, as with ``os.walk``.

    Real (non-link) sub-folders are walked before links at the same level, so a folder reachable both directly
    and through a link is listed under its direct name. ``leaf(path)`` marks folders that are items themselves
    (a diffusers model folder): like files, they are yielded under every name that links to them (the caller
    does not descend into them), while a loop or a second path to a folder of folders is still skipped.
    """
    root = Path(root)
    seen: set[str] = set()
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen and not (leaf is not None and leaf(current)):
            dirs.clear()
            continue
        seen.add(real)
        depth = len(Path(current).relative_to(root).parts)
        kept = []
        for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(current, d)), d)):
            if d.startswith("."):
                continue
            path = os.path.join(current, d)
            if os.path.realpath(path) in seen and not (leaf is not None and leaf(path)):
                continue  # a loop back to a folder above, or a folder already walked
            kept.append(d)
        dirs[:] = kept if max_depth is None or depth < max_depth else []
        yield Path(current), dirs, files
