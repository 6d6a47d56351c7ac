"""Reading back what was written: frame count, exact rate and size, for tests and the node's summary text."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image


@dataclass
class VideoInfo:
    frame_count: int
    fps: Fraction | None  # None for a PNG sequence (it has no rate)
    width: int
    height: int
    codec: str
    duration: float | None  # seconds
    has_audio: bool = False


def _animated_image(path: str) -> VideoInfo:
    # FFmpeg cannot decode animated WebP everywhere, and PIL gives per-frame durations for both formats.
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        total_ms = 0
        for k in range(frames):
            im.seek(k)
            im.load()
            total_ms += int(im.info.get("duration") or 0)
        fps = Fraction(frames * 1000, total_ms).limit_denominator(1001) if total_ms else None
        return VideoInfo(frames, fps, im.width, im.height, (im.format or "").lower(), total_ms / 1000 or None)


def probe(path: str) -> VideoInfo:
    """Counts frames by demuxing (no decoding) because WebM headers do not store a frame count."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
        if not names:
            raise ValueError(f"{path} holds no PNG files")
        with Image.open(os.path.join(path, names[0])) as im:
            return VideoInfo(len(names), None, im.width, im.height, "png", None)
    if os.path.splitext(path)[1].lower() in (".gif", ".webp"):
        return _animated_image(path)
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        width, height, codec = stream.codec_context.width, stream.codec_context.height, stream.codec_context.name
        has_audio = bool(container.streams.audio)
        count = sum(1 for packet in container.demux(stream) if packet.size)
        duration = container.duration / 1_000_000 if container.duration else None
    return VideoInfo(count, Fraction(fps) if fps else None, width, height, codec, duration, has_audio)


def read_frames(path: str, limit: int | None = None) -> np.ndarray:
    """Decoded RGB frames [N,H,W,3] uint8 (uint16 for 16-bit PNG sequences), at most ``limit`` of them.

    Holds everything it returns in memory: meant for tests, previews and short clips. Chroma is upsampled
    with full horizontal interpolation (swscale's default is cruder than what players do, and would make a
    4:2:0 file look ~13 dB worse than it is).
    """
    out: list[np.ndarray] = []
    if os.path.isdir(path):
        for name in sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))[:limit]:
            with av.open(os.path.join(path, name)) as container:
                frame = next(container.decode(video=0))
                deep = frame.format.name.startswith(("rgb48", "rgba64"))
                out.append(frame.to_ndarray(format="rgb48le" if deep else "rgb24"))
        return np.stack(out)
    if os.path.splitext(path)[1].lower() in (".gif", ".webp"):
        with Image.open(path) as im:
            for k in range(getattr(im, "n_frames", 1) if limit is None else min(limit, getattr(im, "n_frames", 1))):
                im.seek(k)
                out.append(np.asarray(im.convert("RGB")))
        return np.stack(out)
    flags = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    reformatter = VideoReformatter()
    with av.open(path) as container:
        for frame in container.decode(video=0):
            out.append(reformatter.reformat(frame, format="rgb24", interpolation=flags).to_ndarray())
            if limit is not None and len(out) >= limit:
                break
    return np.stack(out)
