"""The front door: validate once, encode to a hidden temp name, publish, or clean up and re-raise."""

from __future__ import annotations

import os
from dataclasses import replace
from fractions import Fraction
from typing import Any

from .encode_av import write_av
from .encode_image import png_frame_name, write_gif, write_png_frames, write_webp
from .errors import InputError
from .formats import FormatSpec, chroma_subsampling, get_format, require_encoder, resolve_pix_fmt
from .frames import as_frames, frame_order, padded_size, to_fraction
from .job import CancelCheck, EncodeJob, EncodeOptions, EncodeResult, Progress, ProgressCallback
from .metadata import normalize_metadata
from .paths import publish, remove_quietly, resolve_output_path, temp_path_for

_WRITERS = {"av": write_av, "gif": write_gif, "webp": write_webp, "png": write_png_frames}


_AUTO = ("", "auto", "default")


def _without_auto(opts: EncodeOptions) -> EncodeOptions:
    """Combo widgets need a value meaning "the format's default": "auto"/"default"/"" become None."""
    fields = ("pix_fmt", "prores_profile", "audio_codec")
    auto = {f: None for f in fields if isinstance(getattr(opts, f), str) and getattr(opts, f).lower() in _AUTO}
    return replace(opts, **auto) if auto else opts


def _ignored_option_notes(spec: FormatSpec, opts: EncodeOptions, audio: Any) -> list[str]:
    """Options the chosen format cannot use are ignored, not errors (the node shows all widgets for all
    formats), but the user is told. ``quality`` is left out: nodes always send their WebP quality widget."""
    notes = []
    image = spec.writer in ("gif", "webp", "png")
    if opts.pix_fmt and not spec.pix_fmts:
        notes.append(f"pix_fmt ignored: {spec.id} picks its own pixel format.")
    if opts.loop_count and spec.writer not in ("gif", "webp"):
        notes.append(f"loop_count ignored: {spec.id} has no loop setting.")
    if audio is not None and not spec.supports_audio:
        notes.append(f"audio ignored: {spec.id} cannot carry audio.")
    if opts.crf is not None and image:
        notes.append(f"crf ignored: {spec.id} has no CRF" + (" (use quality)." if spec.writer == "webp" else "."))
    if opts.lossless and spec.writer in ("gif", "png"):
        notes.append(
            f"lossless ignored: {spec.id} " + ("is always lossless." if spec.writer == "png" else "has 256 colours.")
        )
    return notes


def encode_video(
    images: Any,
    output_path: str | os.PathLike[str],
    format_id: str = "video/h264-mp4",
    fps: float | Fraction | str = 24.0,
    options: EncodeOptions | None = None,
    *,
    audio: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    overwrite: bool = False,
) -> EncodeResult:
    """Encode an IMAGE clip ([F,H,W,3|4] float 0..1, or one [H,W,3] image) to ``output_path``.

    The output appears under its final name only when complete. On cancel (``should_cancel()`` true, raising
    EncodeCancelled), on an exception from ``on_progress(done, total)`` or on any error, the partial output is
    removed and the exception propagates. ``total`` counts work units: output frames, plus the palette pass
    over the source frames for GIF.
    """
    spec = get_format(format_id)
    encoder = require_encoder(spec)
    opts = _without_auto(options or EncodeOptions())
    if opts.chunk_size < 1:
        raise InputError("chunk_size", f"{opts.chunk_size} is below 1.", "use 8 or 16.")
    frames = as_frames(images)
    rate = to_fraction(fps)
    pix_fmt = resolve_pix_fmt(spec, encoder, opts.pix_fmt)
    meta = normalize_metadata(metadata)
    notes = _ignored_option_notes(spec, opts, audio)
    if audio is not None and not spec.supports_audio:
        audio = None

    src_h, src_w = int(frames.shape[1]), int(frames.shape[2])
    height, width = padded_size(src_h, src_w, chroma_subsampling(pix_fmt))
    if (height, width) != (src_h, src_w):
        need = {(True, True): "even width and height", (True, False): "an even width", (False, True): "an even height"}
        notes.append(
            f"padded {src_w}x{src_h} to {width}x{height} by repeating the edge pixels: {pix_fmt} needs "
            f"{need[(width != src_w, height != src_h)]}."
        )

    final = os.path.abspath(os.fspath(output_path))
    if os.path.lexists(final) and not overwrite:
        raise FileExistsError(f"{final} already exists; not overwriting it (pass overwrite=True to replace it).")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    order = frame_order(int(frames.shape[0]), opts.pingpong)
    work = len(order) + (int(frames.shape[0]) if spec.writer == "gif" else 0)
    progress = Progress(work, on_progress, should_cancel)
    temp = temp_path_for(final)
    job = EncodeJob(
        spec=spec,
        encoder=encoder,
        frames=frames,
        order=order,
        fps=rate,
        out_path=temp,
        options=opts,
        pix_fmt=pix_fmt,
        width=width,
        height=height,
        metadata=meta,
        audio=audio,
        progress=progress,
        notes=notes,
    )
    try:
        progress.check()
        width, height = _WRITERS[spec.writer](job)
        publish(temp, final, overwrite)
    except BaseException:
        remove_quietly(temp)
        raise
    preview = os.path.join(final, png_frame_name(0, len(order))) if spec.writer == "png" else final
    return EncodeResult(
        path=final,
        format=spec.id,
        frame_count=len(order),
        fps=rate,
        width=width,
        height=height,
        notes=notes,
        encoder=encoder,
        pix_fmt=pix_fmt or ("pal8" if spec.writer == "gif" else "bgra"),
        has_audio=job.has_audio,
        preview_path=preview,
        filename=os.path.basename(final),
    )


def save_video(
    images: Any,
    base_dir: str,
    filename_prefix: str,
    format_id: str = "video/h264-mp4",
    fps: float | Fraction | str = 24.0,
    options: EncodeOptions | None = None,
    **kwargs: Any,
) -> EncodeResult:
    """encode_video into the next free ``<base_dir>/<prefix>_NNNNN<ext>``; fills result.subfolder/filename.

    ``kwargs`` are encode_video's keyword arguments (audio, metadata, on_progress, should_cancel).
    """
    spec = get_format(format_id)
    require_encoder(spec)  # fail before creating sub-folders for a format that cannot be written
    full_path, subfolder, filename = resolve_output_path(base_dir, filename_prefix, spec.extension)
    result = encode_video(images, full_path, format_id, fps, options, overwrite=False, **kwargs)
    result.subfolder, result.filename = subfolder, filename
    return result
