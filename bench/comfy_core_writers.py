"""Plugin for bench/video_writer_bench.py: ComfyUI core's SaveWEBM and SaveAnimatedWEBP on the same frames.

Uses the test ComfyUI that scripts/bootstrap.sh builds (.cache/ComfyUI). Its nodes are called the way the
executor calls them (a class clone with hidden inputs for the V3 node), writing into the bench's out folder.

    .cache/venv/bin/python bench/video_writer_bench.py --plugin comfy_core_writers
"""

from __future__ import annotations

import sys
from pathlib import Path

COMFY = Path(__file__).resolve().parent.parent / ".cache" / "ComfyUI"
sys.path.insert(0, str(COMFY))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils.install_util  # noqa: E402,F401  (before nodes.py puts comfy/, with its own utils.py, first on sys.path)
from comfy.cli_args import args  # noqa: E402

args.cpu = True

import video_writer_bench as bench  # noqa: E402


def _set_output(out_dir: str) -> None:
    import folder_paths

    folder_paths.set_output_directory(out_dir)


def save_webm(frames, fps: float, format_id: str, out_dir: str) -> str:
    from comfy_extras.nodes_video import SaveWEBM

    _set_output(out_dir)
    codec = {"video/vp9-webm": "vp9", "video/av1-webm": "av1"}[format_id]
    node = SaveWEBM.PREPARE_CLASS_CLONE({})
    out = node.EXECUTE_NORMALIZED(images=frames, codec=codec, fps=fps, filename_prefix="core", crf=32.0)
    item = out.ui.as_dict()["images"][0] if hasattr(out.ui, "as_dict") else out.ui["images"][0]
    return str(Path(out_dir) / item["subfolder"] / item["filename"])


def save_animated_webp(frames, fps: float, format_id: str, out_dir: str) -> str:
    from comfy_extras.nodes_images import SaveAnimatedWEBP

    _set_output(out_dir)
    node = SaveAnimatedWEBP()
    node.output_dir = out_dir
    # Lossy quality 90 and libwebp's default method: the same settings as our writer's default.
    result = node.save_images(frames, fps, "core", False, 90, "default")
    item = result["ui"]["images"][0]
    return str(Path(out_dir) / item["subfolder"] / item["filename"])


bench.register_writer("comfyui SaveWEBM", save_webm)
bench.register_writer("comfyui SaveAnimatedWEBP", save_animated_webp)
bench.register_case("comfyui SaveWEBM", "video/vp9-webm")
bench.register_case("comfyui SaveAnimatedWEBP", "image/webp")
bench.register_case("vramwise", "video/vp9-webm")
