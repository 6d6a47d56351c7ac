"""Plain data passed between the writer front door and the per-format encoders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .errors import EncodeCancelled

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class EncodeOptions:
    """Per-format knobs. ``None`` means "the format's default"; options a format cannot use are ignored with a note."""

    crf: int | None = None  # video codecs: lower = better; ranges and defaults per format in formats.py
    quality: int | None = None  # image/webp lossy quality 0..100 (default 90)
    lossless: bool = False  # webp: lossless mode; h264/h265/vp9: mathematically lossless encode of the YUV planes
    pix_fmt: str | None = None  # e.g. yuv420p (default), yuv444p, yuv420p10le; png-frames: rgb24 or rgb48
    loop_count: int = 0  # gif/webp: 0 = loop forever, N = play N times in total
    pingpong: bool = False  # play forwards then backwards (2F-2 frames), without copying the clip
    dither: str = "sierra2_4a"  # gif: FFmpeg paletteuse dither (none, bayer, floyd_steinberg, sierra2_4a, ...)
    prores_profile: str | None = None  # proxy, lt, standard, hq, 4444, 4444xq (default hq, or 4444 for yuv444p10le)
    audio_codec: str | None = None  # mov only: "aac" (default) or "pcm" (16-bit PCM)
    chunk_size: int = 8  # frames converted to integers at once; bounds the host memory the writer adds
    encoder_options: dict[str, str] = field(default_factory=dict)  # raw FFmpeg encoder options, applied last


@dataclass
class EncodeResult:
    """What was written. ``width``/``height`` are after padding; ``notes`` explain every silent-looking change."""

    path: str  # the file, or the folder for image/png-frames
    format: str
    frame_count: int
    fps: Fraction
    width: int
    height: int
    notes: list[str] = field(default_factory=list)
    encoder: str = ""
    pix_fmt: str = ""
    has_audio: bool = False
    preview_path: str = ""  # one file a UI can show: the video itself or the first PNG of a sequence
    filename: str = ""  # set by save_video: name relative to subfolder
    subfolder: str = ""  # set by save_video: "/"-separated, relative to base_dir


class Progress:
    """Counts work units, reports them, and turns ``should_cancel()`` into an exception between chunks."""

    def __init__(self, total: int, on_progress: ProgressCallback | None, should_cancel: CancelCheck | None) -> None:
        self.total = total
        self.done = 0
        self._on_progress = on_progress
        self._should_cancel = should_cancel

    def check(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise EncodeCancelled("Encoding was cancelled; the partial output was removed.")

    def advance(self, n: int) -> None:
        self.done += n
        if self._on_progress is not None:
            # The callback may raise (e.g. ComfyUI's interrupt check); that aborts the encode like a cancel.
            self._on_progress(self.done, self.total)
        self.check()


@dataclass
class EncodeJob:
    """Everything an encoder needs, already validated by the front door."""

    spec: Any  # formats.FormatSpec (Any avoids an import cycle)
    encoder: str
    frames: Any  # torch.Tensor [F,H,W,C], C in (3, 4); only [..., :3] is read
    order: Sequence[int]  # source index of every output frame (pingpong lives here)
    fps: Fraction
    out_path: str  # temporary path; the front door publishes it under the final name
    options: EncodeOptions
    pix_fmt: str
    width: int  # after padding
    height: int
    metadata: dict[str, str] | None
    audio: Any  # the AUDIO dict or None; only containers with audio read it
    progress: Progress
    notes: list[str]
    has_audio: bool = False
