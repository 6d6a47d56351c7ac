"""Animated GIF, animated WebP and PNG sequences, all fed a chunk of frames at a time.

GIF and WebP go through PyAV rather than PIL because PIL's animated savers collect every frame as an image
before writing (a full 8-bit copy of the clip, and more for GIF); FFmpeg's encoders take frames one by one.
"""

from __future__ import annotations

import os
from contextlib import suppress
from fractions import Fraction

import av
import av.filter
from av.video.reformatter import VideoReformatter

from .errors import InputError
from .frames import iter_chunks
from .job import EncodeJob
from .metadata import add_gif_comments, add_webp_exif, insert_png_text, webp_exif_payload

GIF_DITHERS = ("none", "bayer", "heckbert", "floyd_steinberg", "sierra2", "sierra2_4a", "sierra3", "burkes", "atkinson")
_CENTISECOND = Fraction(1, 100)
_MILLISECOND = Fraction(1, 1000)


def _timestamps(index: int, fps: Fraction, unit: Fraction) -> int:
    # Rounding each timestamp (not each duration) keeps the average rate exact: 16 fps in 1/100 s alternates
    # 6 and 7 instead of drifting to 16.7 fps.
    return round(index / (fps * unit))


def _loop_option(job: EncodeJob, gif: bool) -> str:
    loops = job.options.loop_count
    if loops < 0:
        raise InputError("loop_count", f"{loops} is negative.", "use 0 to loop forever or N to play N times.")
    if not gif:
        return str(loops)  # WebP's ANIM chunk counts plays, 0 = forever
    # GIF's NETSCAPE block counts repeats after the first play, and 0 there means forever; FFmpeg's -1 omits it.
    return "0" if loops == 0 else ("-1" if loops == 1 else str(loops - 1))


def _drain(sink: av.filter.context.FilterContext, emit) -> None:
    while True:
        try:
            frame = sink.pull()
        except (BlockingIOError, EOFError, av.error.EOFError):
            return
        emit(frame)


def write_gif(job: EncodeJob) -> tuple[int, int]:
    """Two passes: palettegen builds one palette from every frame (a colour histogram, not the frames), then
    paletteuse maps each chunk onto it, so memory stays bounded whatever the clip length."""
    width, height = job.width, job.height
    if job.fps > 50:
        raise InputError(
            "frame_rate",
            f"{float(job.fps):g} fps is too fast for GIF (delays are 1/100 s; browsers slow "
            "anything under 2/100 s to 1/10 s).",
            "use 50 fps or less, or pick image/webp or a video format.",
        )
    if job.options.dither not in GIF_DITHERS:
        raise InputError("dither", f"'{job.options.dither}' is unknown.", f"use one of {', '.join(GIF_DITHERS)}.")
    frame_count = int(job.frames.shape[0])

    graph = av.filter.Graph()
    src = graph.add_buffer(width=width, height=height, format="rgb24", time_base=_CENTISECOND)
    palettegen = graph.add("palettegen", "max_colors=256:stats_mode=full")
    sink = graph.add("buffersink")
    src.link_to(palettegen)
    palettegen.link_to(sink)
    graph.configure()
    pts = 0
    for chunk in iter_chunks(job.frames, range(frame_count), job.options.chunk_size, height, width):
        for pixels in chunk:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = pts  # palettegen only needs increasing timestamps
            pts += 1
            src.push(frame)
        job.progress.advance(len(chunk))
    src.push(None)
    palette = sink.pull()

    graph = av.filter.Graph()
    src = graph.add_buffer(width=width, height=height, format="rgb24", time_base=_CENTISECOND)
    pal_src = graph.add_buffer(
        width=palette.width, height=palette.height, format=palette.format.name, time_base=_CENTISECOND
    )
    # diff_mode=rectangle re-dithers only what changed, which stops static areas from shimmering.
    paletteuse = graph.add("paletteuse", f"dither={job.options.dither}:diff_mode=rectangle")
    sink = graph.add("buffersink")
    src.link_to(paletteuse, 0, 0)
    pal_src.link_to(paletteuse, 0, 1)
    paletteuse.link_to(sink)
    graph.configure()
    palette.pts = 0
    pal_src.push(palette)
    pal_src.push(None)  # paletteuse keeps using the last palette frame after its input ends

    container = av.open(job.out_path, "w", format="gif", container_options={"loop": _loop_option(job, gif=True)})
    try:
        stream = container.add_stream("gif", rate=job.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
        stream.codec_context.time_base = _CENTISECOND

        def emit(frame: av.VideoFrame) -> None:
            for packet in stream.encode(frame):
                container.mux(packet)

        index = 0
        for chunk in iter_chunks(job.frames, job.order, job.options.chunk_size, height, width):
            for pixels in chunk:
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = _timestamps(index, job.fps, _CENTISECOND)
                index += 1
                src.push(frame)
                _drain(sink, emit)
            job.progress.advance(len(chunk))
        src.push(None)
        _drain(sink, emit)
        emit(None)
        container.close()
    except BaseException:
        with suppress(Exception):
            container.close()
        raise
    if job.metadata:
        add_gif_comments(job.out_path, job.metadata)
    return width, height


def write_webp(job: EncodeJob) -> tuple[int, int]:
    """libwebp's animation encoder. Lossy mode may merge consecutive frames that differ by less than its
    quality threshold into one longer frame; the timing is preserved, the decoded frame count can drop."""
    width, height = job.width, job.height
    if max(width, height) > 16383:
        raise InputError(
            "images", f"{width}x{height} exceeds WebP's 16383 pixel limit.", "downscale or pick a video format."
        )
    quality = 90 if job.options.quality is None else job.options.quality
    if not 0 <= quality <= 100:
        raise InputError("quality", f"{quality} is out of range.", "use 0..100.")
    container = av.open(job.out_path, "w", format="webp", container_options={"loop": _loop_option(job, gif=False)})
    try:
        stream = container.add_stream(job.encoder, rate=job.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgra"  # RGB in: libwebp does its own YUV
        stream.codec_context.time_base = _MILLISECOND
        options = {"lossless": "1" if job.options.lossless else "0", "quality": str(quality)}
        options.update({str(k): str(v) for k, v in job.options.encoder_options.items()})
        stream.options = options
        reformatter = VideoReformatter()
        index = 0
        for chunk in iter_chunks(job.frames, job.order, job.options.chunk_size, height, width):
            for pixels in chunk:
                frame = reformatter.reformat(av.VideoFrame.from_ndarray(pixels, format="rgb24"), format="bgra")
                frame.pts = _timestamps(index, job.fps, _MILLISECOND)
                frame.duration = _timestamps(index + 1, job.fps, _MILLISECOND) - frame.pts
                frame.time_base = _MILLISECOND
                index += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
            job.progress.advance(len(chunk))
        for packet in stream.encode(None):
            container.mux(packet)
        container.close()
    except BaseException:
        with suppress(Exception):
            container.close()
        raise
    if job.metadata:
        add_webp_exif(job.out_path, webp_exif_payload(job.metadata), width, height)
    return width, height


def png_frame_name(index: int, total: int) -> str:
    return f"frame_{index + 1:0{max(5, len(str(total)))}d}.png"


def write_png_frames(job: EncodeJob) -> tuple[int, int]:
    """One PNG per output frame in the folder job.out_path, numbered from 1; metadata goes into the first."""
    width, height = job.width, job.height
    bits = 16 if job.pix_fmt == "rgb48be" else 8
    os.makedirs(job.out_path)
    ctx = av.codec.CodecContext.create(job.encoder, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, job.pix_fmt
    # "mixed" picks a PNG row filter per line like libpng: files ~25x smaller than FFmpeg's default "none".
    ctx.options = {"pred": "mixed", **{str(k): str(v) for k, v in job.options.encoder_options.items()}}
    reformatter = VideoReformatter()
    total = len(job.order)
    index = 0
    for chunk in iter_chunks(job.frames, job.order, job.options.chunk_size, height, width, bits):
        for pixels in chunk:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24" if bits == 8 else "rgb48le")
            if bits == 16:
                frame = reformatter.reformat(frame, format="rgb48be")  # PNG stores 16-bit samples big-endian
            data = b"".join(bytes(p) for p in ctx.encode(frame))
            if index == 0 and job.metadata:
                data = insert_png_text(data, job.metadata)
            with open(os.path.join(job.out_path, png_frame_name(index, total)), "wb") as f:
                f.write(data)
            index += 1
        job.progress.advance(len(chunk))
    return width, height
