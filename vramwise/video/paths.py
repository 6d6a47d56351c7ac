"""Where outputs go: prefix validation, counters, and publishing a finished temp file without overwriting."""

from __future__ import annotations

import os
import re
import shutil
import uuid

from .errors import InputError

# Longest file or folder name (bytes) on Linux/macOS file systems (NAME_MAX); longer parts fail with OSError 36.
NAME_MAX = 255
# What we add to the prefix's last part: "_<counter>" and the extension, and for the hidden temp sibling "." in
# front and ".<8 hex>.partial" behind (temp_path_for).
_NAME_OVERHEAD = len("._00000") + len(".12345678.partial")
_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*]')  # invalid on Windows, or ambiguous (":" makes "C:x" drive-relative)


def _prefix_error(problem: str) -> InputError:
    return InputError(
        "filename_prefix",
        problem,
        "use a relative name such as 'clips/my_video' (sub-folders allowed, no '..', no absolute paths).",
    )


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def resolve_output_path(base_dir: str, filename_prefix: str, extension: str) -> tuple[str, str, str]:
    """Next free ``<base_dir>/<sub>/<name>_<counter:05><extension>`` for a prefix like ``"sub/name"``.

    Sub-folders are created. The counter continues after the highest one already used by any file or folder
    named ``<name>_<digits>`` in that folder (whatever the extension, like ComfyUI's own savers), so deleting an
    old output never makes a new one reuse its number. ``extension`` is "" for a folder output.

    Returns (full_path, subfolder, filename) with subfolder "/"-separated and relative to base_dir.
    Raises InputError (a ValueError) naming ``filename_prefix`` for absolute paths, "..", bad characters, or
    sub-folders that resolve outside base_dir (symlinks included).
    """
    if extension and not extension.startswith("."):
        extension = "." + extension
    prefix = (filename_prefix or "").strip()
    if not prefix:
        raise _prefix_error("is empty.")
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", prefix):
        raise _prefix_error(f"'{filename_prefix}' is an absolute path.")
    if _BAD_CHARS.search(prefix):
        raise _prefix_error(f"'{filename_prefix}' contains a character that is not allowed in file names.")
    parts = [p for p in re.split(r"[\\/]+", prefix) if p not in ("", ".")]
    if ".." in parts:
        raise _prefix_error(f"'{filename_prefix}' contains '..'.")
    if not parts or prefix.endswith(("/", "\\")):
        raise _prefix_error(f"'{filename_prefix}' has no file name after the last '/'.")
    *subdirs, name = parts
    for part in subdirs:
        if len(part.encode()) > NAME_MAX:
            raise InputError(
                "filename_prefix",
                f"its sub-folder '{part[:24]}...' is {len(part.encode())} bytes long; folder names can have at most {NAME_MAX}.",
                f"shorten each sub-folder name to at most {NAME_MAX} characters.",
            )
    longest = NAME_MAX - _NAME_OVERHEAD - len(extension.encode())
    if len(name.encode()) > longest:
        raise InputError(
            "filename_prefix",
            f"its file name part '{name[:24]}...' is {len(name.encode())} bytes long; with the counter and extension "
            f"the file name would exceed the {NAME_MAX} bytes file systems allow.",
            f"shorten the part after the last '/' to at most {longest} characters.",
        )

    root = os.path.realpath(base_dir)
    folder = os.path.join(root, *subdirs)
    # realpath follows every symlink that already exists, so an escape is caught before anything is created.
    if not _inside(os.path.realpath(folder), root):
        raise _prefix_error(f"'{filename_prefix}' resolves outside the output folder (a symlink?).")
    os.makedirs(folder, exist_ok=True)
    if not _inside(os.path.realpath(folder), root):  # something swapped a folder for a symlink meanwhile
        raise _prefix_error(f"'{filename_prefix}' resolves outside the output folder (a symlink?).")

    taken = re.compile(re.escape(name) + r"_(\d{5,})(?:[._].*)?$", re.IGNORECASE)
    counter = 1
    for entry in os.listdir(folder):
        match = taken.match(entry)
        if match:
            counter = max(counter, int(match.group(1)) + 1)
    while True:
        filename = f"{name}_{counter:05d}{extension}"
        full_path = os.path.join(folder, filename)
        if not os.path.lexists(full_path):
            return full_path, "/".join(subdirs), filename
        counter += 1


def temp_path_for(final_path: str) -> str:
    """A hidden sibling name: same folder (so publishing is a rename) and never matched by the counter scan."""
    folder, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial")


def remove_quietly(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def publish(temp: str, final_path: str, overwrite: bool = False) -> None:
    """Give the finished temp output its final name; refuses to replace an existing one unless asked."""
    if overwrite:
        if os.path.isdir(final_path) and not os.path.islink(final_path):
            shutil.rmtree(final_path)
        os.replace(temp, final_path)
        return
    if os.path.isdir(temp):
        if os.path.lexists(final_path):
            raise FileExistsError(f"{final_path} already exists; not overwriting it.")
        os.rename(temp, final_path)
        return
    try:
        os.link(temp, final_path)  # fails atomically if the name was taken after resolve_output_path
    except FileExistsError:
        raise FileExistsError(f"{final_path} already exists; not overwriting it.") from None
    except OSError:
        # Filesystems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(final_path):
            raise FileExistsError(f"{final_path} already exists; not overwriting it.") from None
        os.replace(temp, final_path)
        return
    os.remove(temp)
