"""VRAMWiseVideoWriter: the video file users keep, share and drop back into ComfyUI (the graph travels inside)."""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import torch

from ..vramwise.errors import InputError
from ..vramwise.video import EncodeOptions, available_formats, get_format, pix_fmts_for, save_video
from . import comfy_bridge as comfy
from .comfy_bridge import InputImpl, Types, io, ui
from .types import CATEGORY

DEFAULT_FORMAT = "video/h264-mp4"
PIX_FMTS = ["yuv420p", "yuv444p", "yuv420p10le", "yuv444p10le", "yuv422p10le", "rgb24", "rgb48"]
DITHERS = ["sierra2_4a", "floyd_steinberg", "bayer", "none"]


def _formats() -> list[str]:
    formats = available_formats()
    # The default first, so a fresh node starts on the format that plays everywhere.
    return sorted(formats, key=lambda f: (f != DEFAULT_FORMAT, f))


def _metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str] | None:
    if comfy.metadata_disabled():
        return None
    meta: dict[str, str] = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        meta[key] = json.dumps(value)
    return meta or None


def _pix_fmt(format_id: str, pix_fmt: str) -> str | None:
    """The pixel format to ask for, None for the format's own choice, or an error naming what would work."""
    valid = pix_fmts_for(format_id)
    if not valid or pix_fmt in valid:
        return pix_fmt if valid else None
    if pix_fmt == "yuv420p":
        # The widget's default: formats without it (PNG frames, ProRes) pick their own default.
        return None
    raise InputError(
        "pix_fmt", f"{format_id} cannot be written as {pix_fmt} with the installed FFmpeg.",
        f"pick one of {', '.join(valid)}.",
    )


class VRAMWiseVideoWriter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseVideoWriter",
            display_name="VRAMWise Video Writer",
            category=CATEGORY,
            description=(
                "Writes frames to a video or animated image with the workflow embedded (drop the file onto the "
                "canvas to get the graph back). Encodes in small chunks, so it never holds a second copy of the clip."
            ),
            inputs=[
                io.Image.Input("images", tooltip="Frames [frames, height, width, 3] from any image node."),
                io.Float.Input("fps", default=16.0, min=0.01, max=240.0, step=0.01, round=0.001,
                               tooltip="Frames per second; 23.976 and 29.97 are stored as exact NTSC rates. Wan: 16, TI2V-5B: 24."),
                io.Combo.Input("format", options=_formats(), default=DEFAULT_FORMAT,
                               tooltip="Only formats the installed FFmpeg can encode are listed. H.264 MP4 plays everywhere."),
                io.String.Input("filename_prefix", default="vramwise/video",
                                tooltip="File name start; sub-folders allowed (inside the output folder only). A counter is added, nothing is overwritten."),
                io.Boolean.Input("save_output", default=True,
                                 tooltip="On: keep the file in the output folder. Off: preview only (temp folder, cleaned by ComfyUI)."),
                io.Int.Input("crf", default=-1, min=-1, max=63,
                             tooltip="Video quality, lower is better; -1 uses the format's default (H.264 19, H.265 22, VP9/AV1 32)."),
                io.Int.Input("quality", default=90, min=0, max=100, tooltip="Lossy WebP quality."),
                io.Boolean.Input("lossless", default=False,
                                 tooltip="Lossless WebP, or mathematically lossless H.264/H.265/VP9 (large files)."),
                io.Combo.Input("pix_fmt", options=PIX_FMTS, default="yuv420p",
                               tooltip="yuv420p plays everywhere; yuv444p keeps colour detail; 10le = 10-bit (H.264/H.265/AV1/ProRes). "
                               "GIF and WebP pick their own; PNG frames take rgb24 or rgb48."),
                io.Int.Input("loop_count", default=0, min=0, max=100, tooltip="GIF/WebP: 0 loops forever, N plays N times."),
                io.Boolean.Input("pingpong", default=False, tooltip="Play forwards then backwards."),
                io.Combo.Input("dither", options=DITHERS, default=DITHERS[0], tooltip="GIF palette dithering."),
                io.Audio.Input("audio", optional=True, tooltip="Muxed into MP4, WebM and MOV; trimmed to the video length."),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="The written file (or folder, for PNG frames)."),
                io.Video.Output(display_name="video", tooltip="For core video nodes. For GIF/WebP/PNG it carries the input frames (not pingponged)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, images: torch.Tensor, fps: float, format: str, filename_prefix: str, save_output: bool, crf: int,
        quality: int, lossless: bool, pix_fmt: str, loop_count: int, pingpong: bool, dither: str,
        audio: dict | None = None,
    ) -> io.NodeOutput:
        if images is None or images.ndim != 4 or images.shape[0] < 1:
            raise InputError("images", "expected a batch of frames [frames, height, width, 3].",
                             "connect the frames output of VRAMWise VAE Decode or any IMAGE batch.")
        spec = get_format(format)
        options = EncodeOptions(
            crf=None if crf < 0 else crf, quality=quality, lossless=lossless, pix_fmt=_pix_fmt(format, pix_fmt),
            loop_count=loop_count, pingpong=pingpong, dither=dither,
        )
        base = comfy.output_directory() if save_output else comfy.temp_directory()
        progress = comfy.Progress(images.shape[0])
        result = save_video(
            images, str(base), filename_prefix, format, fps, options,
            audio=audio, metadata=_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo),
            on_progress=lambda done, total: progress.update(done, total),
        )
        folder = io.FolderType.output if save_output else io.FolderType.temp
        subfolder, filename = comfy.relative_to_output(result.preview_path or result.path)
        shown = ui.PreviewVideo([ui.SavedResult(filename, subfolder, folder)]).as_dict()
        text = f"{result.path}\n{result.frame_count} frames {result.width}x{result.height} @ {float(result.fps):g} fps, {result.encoder} {result.pix_fmt}"
        shown["text"] = ["\n".join([text] + list(result.notes))]
        if spec.writer == "av":
            video = InputImpl.VideoFromFile(result.path)
        else:
            video = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=Fraction(result.fps)))
        return io.NodeOutput(result.path, video, ui=shown)
