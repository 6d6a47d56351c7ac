"""The start/end pictures the shipped workflows load, put where ComfyUI's LoadImage finds them.

Every template's LoadImage names ``vramwise_start.png`` (and FLF2V/EasyAnimate ``vramwise_end.png``); LoadImage only
lists files of ComfyUI's input folder, so a template opened on a fresh install would fail validation before the
user could pick a picture. The pack ships them in ``assets/input/`` and copies them over at start when missing.
"""

from __future__ import annotations

from pathlib import Path

PACK_PICTURES = Path(__file__).resolve().parent.parent / "assets" / "input"


def install_input_pictures(input_dir: Path, source: Path = PACK_PICTURES) -> tuple[list[Path], str | None]:
    """Copy each shipped picture into ``input_dir`` unless a file of that name is already there (a user's file
    is never overwritten). Returns the files written and, when the folder cannot be written, a note for the log
    instead of an exception: a read-only input folder must not keep the nodes from loading."""
    written: list[Path] = []
    try:
        input_dir.mkdir(parents=True, exist_ok=True)
        for picture in sorted(source.glob("*.png")):
            dest = input_dir / picture.name
            if dest.exists() or dest.is_symlink():
                continue
            try:
                # "x": create only, so a file another process (or the user) put there meanwhile is kept.
                with open(dest, "xb") as out:
                    out.write(picture.read_bytes())
            except FileExistsError:
                continue
            written.append(dest)
    except OSError as e:
        return written, (f"VRAMWise: could not copy the template pictures into {input_dir} ({e}); "
                         f"copy {source}/*.png there by hand to run the shipped workflows unchanged.")
    return written, None
