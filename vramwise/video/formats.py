"""The format registry: stable user-facing ids, what each needs from FFmpeg, and probing for it.

Ids look like MIME types ("video/h264-mp4") because ComfyUI users already know them from other video nodes and
because they sort into video vs image outputs at a glance. Ids never change once published: saved workflows
store them in widget values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import av

from .errors import FormatUnavailableError, InputError


@dataclass(frozen=True)
class FormatSpec:
    id: str
    label: str
    extension: str  # with the dot; "" means the output is a folder (image/png-frames)
    writer: str  # which encoder module handles it: "av", "gif", "webp" or "png"
    container: str  # FFmpeg muxer name; "" when no muxer is used
    encoders: tuple[str, ...]  # software encoders in order of preference (hardware ones fail on CPU-only hosts)
    pix_fmts: tuple[str, ...] = ()  # offered pixel formats, default first; empty = not user-selectable
    crf_default: int | None = None
    crf_max: int | None = None
    audio_codecs: tuple[str, ...] = ()  # in order of preference; empty = the container carries no audio here
    filters: tuple[str, ...] = ()  # FFmpeg filters the writer needs

    @property
    def supports_audio(self) -> bool:
        return bool(self.audio_codecs)


_YUV_8_10 = ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")

# fmt: off
_SPECS = (
    FormatSpec(
        id="video/h264-mp4", label="H.264 MP4", extension=".mp4", writer="av", container="mp4",
        encoders=("libx264", "libopenh264"), pix_fmts=_YUV_8_10, crf_default=19, crf_max=51,
        audio_codecs=("aac",),
    ),
    FormatSpec(
        id="video/h265-mp4", label="H.265 / HEVC MP4", extension=".mp4", writer="av", container="mp4",
        encoders=("libx265",), pix_fmts=_YUV_8_10 + ("gbrp",), crf_default=22, crf_max=51,
        audio_codecs=("aac",),
    ),
    FormatSpec(
        id="video/vp9-webm", label="VP9 WebM", extension=".webm", writer="av", container="webm",
        encoders=("libvpx-vp9",), pix_fmts=_YUV_8_10 + ("gbrp",), crf_default=32, crf_max=63,
        audio_codecs=("libopus", "opus"),
    ),
    FormatSpec(
        id="video/av1-webm", label="AV1 WebM", extension=".webm", writer="av", container="webm",
        encoders=("libsvtav1", "libaom-av1", "librav1e"), pix_fmts=_YUV_8_10, crf_default=32, crf_max=63,
        audio_codecs=("libopus", "opus"),
    ),
    FormatSpec(
        id="video/av1-mp4", label="AV1 MP4", extension=".mp4", writer="av", container="mp4",
        encoders=("libsvtav1", "libaom-av1", "librav1e"), pix_fmts=_YUV_8_10, crf_default=32, crf_max=63,
        audio_codecs=("aac",),
    ),
    FormatSpec(
        id="video/prores-mov", label="Apple ProRes MOV", extension=".mov", writer="av", container="mov",
        encoders=("prores_ks", "prores_aw"), pix_fmts=("yuv422p10le", "yuv444p10le"),
        audio_codecs=("aac", "pcm_s16le"),
    ),
    FormatSpec(
        id="image/gif", label="Animated GIF", extension=".gif", writer="gif", container="gif",
        encoders=("gif",), filters=("palettegen", "paletteuse"),
    ),
    FormatSpec(
        id="image/webp", label="Animated WebP", extension=".webp", writer="webp", container="webp",
        encoders=("libwebp_anim",),
    ),
    FormatSpec(
        id="image/png-frames", label="PNG sequence (folder)", extension="", writer="png", container="",
        encoders=("png",), pix_fmts=("rgb24", "rgb48"),
    ),
)
# fmt: on
FORMATS: dict[str, FormatSpec] = {spec.id: spec for spec in _SPECS}

# Pixel formats that are ours, not FFmpeg's, mapped to what the encoder is given.
_ALIASES = {"rgb48": "rgb48be"}


@cache
def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises UnknownCodecError (or ValueError on old versions)
        return False
    return True


@cache
def has_filter(name: str) -> bool:
    return name in av.filter.filters_available


def pick_encoder(spec: FormatSpec) -> str | None:
    """The first encoder of the spec that this FFmpeg has, or None when the format cannot be written."""
    if not all(has_filter(f) for f in spec.filters):
        return None
    return next((name for name in spec.encoders if has_encoder(name)), None)


def available_formats() -> list[str]:
    """Ids of the formats whose encoder (and filters) exist in the installed PyAV/FFmpeg, in registry order."""
    return [fid for fid, spec in FORMATS.items() if pick_encoder(spec) is not None]


def get_format(format_id: str) -> FormatSpec:
    spec = FORMATS.get(format_id)
    if spec is None:
        raise InputError("format", f"'{format_id}' is not a known format.", f"use one of: {', '.join(FORMATS)}.")
    return spec


def require_encoder(spec: FormatSpec) -> str:
    encoder = pick_encoder(spec)
    if encoder is None:
        missing = [f for f in spec.filters if not has_filter(f)]
        if missing:
            needed = f"FFmpeg filter(s) {', '.join(missing)} missing from PyAV {av.__version__}"
        else:
            needed = (
                f"none of the encoders {', '.join(spec.encoders)} is in the FFmpeg bundled with PyAV {av.__version__}"
            )
        raise FormatUnavailableError(spec.id, needed, available_formats())
    return encoder


def encoder_pix_fmts(encoder: str) -> set[str]:
    formats = av.codec.Codec(encoder, "w").video_formats or ()
    return {f.name for f in formats}


def pix_fmts_for(format_id: str) -> list[str]:
    """Pixel formats the node may offer for a format: the registry's list cut down to what the encoder takes."""
    spec = get_format(format_id)
    encoder = pick_encoder(spec)
    if encoder is None or not spec.pix_fmts:
        return []
    supported = encoder_pix_fmts(encoder)
    return [p for p in spec.pix_fmts if _ALIASES.get(p, p) in supported]


def resolve_pix_fmt(spec: FormatSpec, encoder: str, requested: str | None) -> str:
    """Validate the user's pixel format; returns the FFmpeg name to encode with."""
    if not spec.pix_fmts:
        return ""  # the writer picks (gif: pal8, webp: bgra)
    offered = pix_fmts_for(spec.id)
    choice = requested or (offered[0] if offered else "")
    if choice not in offered:
        raise InputError(
            "pix_fmt",
            f"'{requested}' is not supported by {spec.id} with encoder {encoder}.",
            f"use one of: {', '.join(offered)}.",
        )
    return _ALIASES.get(choice, choice)


def chroma_subsampling(pix_fmt: str) -> tuple[int, int]:
    """(x, y) factors: sizes must be multiples of these, so odd sizes get padded for 4:2:0 and 4:2:2."""
    if "420" in pix_fmt:
        return 2, 2
    if "422" in pix_fmt:
        return 2, 1
    if "440" in pix_fmt:
        return 1, 2
    return 1, 1
