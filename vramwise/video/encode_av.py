"""MP4 / WebM / MOV through PyAV: video stream settings per encoder, colour tagging, and audio muxing."""

from __future__ import annotations

import math
import os
from contextlib import suppress
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter

from .errors import FormatUnavailableError, InputError
from .formats import available_formats, has_encoder
from .frames import iter_chunks
from .job import EncodeJob

# FFmpeg enum values (AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace / AVColorRange).
_BT709, _SPC_RGB, _RANGE_MPEG, _RANGE_JPEG = 1, 0, 1, 2

_PRORES_PROFILES = {"proxy": 0, "lt": 1, "standard": 2, "hq": 3, "4444": 4, "4444xq": 5}
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _is_high_bit(pix_fmt: str) -> bool:
    return pix_fmt.endswith(("10le", "12le", "10be", "12be"))


def _video_settings(job: EncodeJob, width: int, height: int) -> tuple[dict[str, str], dict[str, Any]]:
    """(encoder options, codec-context attributes) for the chosen encoder; notes go to job.notes."""
    enc, opts, spec = job.encoder, job.options, job.spec
    if opts.crf is not None and (spec.crf_max is None or not 0 <= opts.crf <= spec.crf_max):
        if spec.crf_max is None:
            job.notes.append(f"crf ignored: {spec.id} has no CRF (quality is set by prores_profile).")
        else:
            raise InputError("crf", f"{opts.crf} is out of range for {spec.id}.", f"use 0..{spec.crf_max}.")
    crf = opts.crf if opts.crf is not None else spec.crf_default
    lossless_ok = enc in ("libx264", "libx265", "libvpx-vp9", "libaom-av1")
    if opts.lossless and not lossless_ok:
        raise InputError(
            "lossless",
            f"the {enc} encoder used for {spec.id} has no lossless mode.",
            "turn lossless off, or pick video/h264-mp4, video/h265-mp4, video/vp9-webm or image/png-frames.",
        )
    options: dict[str, str] = {}
    attrs: dict[str, Any] = {}
    if enc == "libx264":
        options = {"qp": "0"} if opts.lossless else {"crf": str(crf)}
    elif enc == "libopenh264":
        # No CRF in OpenH264: derive a bitrate that doubles every 6 CRF steps like x264's quality scale does.
        bits_per_pixel = 0.1 * 2 ** ((23 - crf) / 6)
        attrs["bit_rate"] = int(width * height * float(job.fps) * bits_per_pixel)
        job.notes.append(f"libopenh264 has no CRF: used {attrs['bit_rate'] // 1000} kbit/s for crf {crf}.")
    elif enc == "libx265":
        params = "log-level=error" + (":lossless=1" if opts.lossless else "")
        options = {"x265-params": params} if opts.lossless else {"crf": str(crf), "x265-params": params}
        attrs["codec_tag"] = "hvc1"  # Apple players and browsers refuse HEVC in MP4 tagged hev1
    elif enc == "libvpx-vp9":
        # bit_rate 0 makes crf a constant-quality target instead of a cap; cpu-used 4 + row-mt keep it fast.
        options = {"lossless": "1"} if opts.lossless else {"crf": str(crf)}
        options.update({"row-mt": "1", "deadline": "good", "cpu-used": "4"})
        attrs["bit_rate"] = 0
    elif enc == "libsvtav1":
        options = {"crf": str(crf)}
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encode otherwise; 1 = errors only
    elif enc == "libaom-av1":
        options = {"aom-params": "lossless=1"} if opts.lossless else {"crf": str(crf)}
        options.update({"cpu-used": "6", "row-mt": "1"})
        attrs["bit_rate"] = 0
    elif enc == "librav1e":
        options = {"qp": str(round(crf * 255 / 63))}  # rav1e's quantizer runs 0..255
    elif enc in ("prores_ks", "prores_aw"):
        is_444 = "444" in job.pix_fmt
        name = (opts.prores_profile or ("4444" if is_444 else "hq")).lower()
        if name not in _PRORES_PROFILES:
            raise InputError("prores_profile", f"'{name}' is unknown.", f"use one of {', '.join(_PRORES_PROFILES)}.")
        if name.startswith("4444") != is_444:
            need = "yuv444p10le" if name.startswith("4444") else "yuv422p10le"
            raise InputError("prores_profile", f"'{name}' needs pix_fmt {need}.", f"set pix_fmt to {need}.")
        options = {"profile": str(_PRORES_PROFILES[name])}
        if enc == "prores_ks":
            options["vendor"] = "apl0"  # some Apple tools only trust ProRes that claims Apple's vendor id
    if opts.lossless and not job.pix_fmt.startswith("gbr"):
        job.notes.append("lossless: the YUV planes are exact, the RGB to YUV conversion before them still rounds.")
    if spec.id == "video/h264-mp4" and job.pix_fmt != "yuv420p":
        job.notes.append(f"H.264 in {job.pix_fmt} does not play in most browsers (ComfyUI's preview included).")
    options.update({str(k): str(v) for k, v in opts.encoder_options.items()})
    return options, attrs


class _AudioWriter:
    """Feeds the AUDIO waveform to its stream in step with the video so the muxer never buffers much."""

    def __init__(self, container: Any, job: EncodeJob, frame_count: int) -> None:
        audio = job.audio
        if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
            raise InputError(
                "audio", "expected an AUDIO dict with 'waveform' and 'sample_rate'.", "connect an AUDIO output."
            )
        wave = audio["waveform"]
        if isinstance(wave, np.ndarray):
            wave = torch.from_numpy(wave)
        while wave.dim() < 3:
            wave = wave.unsqueeze(0)
        if wave.dim() != 3 or wave.shape[-1] == 0:
            raise InputError(
                "audio",
                f"waveform shape {list(wave.shape)} is not [batch, channels, samples].",
                "connect an AUDIO output.",
            )
        if wave.shape[0] > 1:
            job.notes.append(f"audio: used the first of {wave.shape[0]} waveforms in the batch.")
        wave = wave[0]
        channels = int(wave.shape[0])
        if channels not in _LAYOUTS:
            job.notes.append(f"audio: {channels} channels have no standard layout; kept the first two.")
            wave, channels = wave[:2], 2
        self.wave, self.in_layout, self.rate = wave, _LAYOUTS[channels], int(audio["sample_rate"])
        if self.rate <= 0:
            raise InputError(
                "audio", f"sample_rate {audio['sample_rate']} is not positive.", "connect an AUDIO output."
            )

        codecs = [c for c in job.spec.audio_codecs if has_encoder(c)]
        wanted = job.options.audio_codec
        if wanted:
            name = {"pcm": "pcm_s16le", "aac": "aac"}.get(wanted.lower(), wanted)
            if job.spec.id != "video/prores-mov" or name not in codecs:
                raise InputError(
                    "audio_codec", f"'{wanted}' is not offered for {job.spec.id}.", "leave it empty for the default."
                )
            codecs = [name]
        if not codecs:
            raise FormatUnavailableError(
                job.spec.id, f"no audio encoder among {', '.join(job.spec.audio_codecs)}", available_formats()
            )
        codec = av.codec.Codec(codecs[0], "w")
        rates = codec.audio_rates
        out_rate = self.rate if not rates or self.rate in rates else 48000
        formats = [f.name for f in codec.audio_formats or ()]
        out_format = next((f for f in ("fltp", "flt") if f in formats), formats[0] if formats else "fltp")
        out_layout = "mono" if channels == 1 else "stereo"
        self.stream = container.add_stream(codec.name, rate=out_rate)
        self.stream.layout = out_layout
        if codec.name == "opus":
            self.stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own Opus encoder is flagged so
        self.resampler = av.AudioResampler(format=out_format, layout=out_layout, rate=out_rate)
        self.container = container

        samples = int(wave.shape[1])
        self.total = min(samples, math.ceil(frame_count / job.fps * self.rate))
        if self.total < samples:
            job.notes.append(
                f"audio trimmed from {samples / self.rate:.2f}s to the video's {self.total / self.rate:.2f}s."
            )
        self.pos = 0

    def write_until(self, seconds: Fraction | None) -> None:
        """Encode samples up to ``seconds`` (None: all that remain)."""
        target = self.total if seconds is None else min(self.total, math.ceil(seconds * self.rate))
        while self.pos < target:
            n = min(target - self.pos, 16384)
            piece = self.wave[:, self.pos : self.pos + n].to(torch.float32).cpu().numpy()
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp", layout=self.in_layout)
            frame.sample_rate = self.rate
            frame.pts = self.pos
            frame.time_base = Fraction(1, self.rate)
            self._encode(self.resampler.resample(frame))
            self.pos += n

    def finish(self) -> None:
        self.write_until(None)
        self._encode(self.resampler.resample(None))
        for packet in self.stream.encode(None):
            self.container.mux(packet)

    def _encode(self, frames: list[Any]) -> None:
        for frame in frames:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)


def write_av(job: EncodeJob) -> tuple[int, int]:
    """Encode job.frames into job.out_path; returns the (width, height) written."""
    spec, pix_fmt = job.spec, job.pix_fmt
    width, height = job.width, job.height
    container_options = {}
    if spec.container in ("mp4", "mov"):
        # use_metadata_tags keeps arbitrary keys (prompt, workflow); faststart lets browsers play before the end.
        container_options["movflags"] = "use_metadata_tags+faststart"
    options, attrs = _video_settings(job, width, height)

    container = av.open(job.out_path, "w", format=spec.container, container_options=container_options)
    try:
        for key, value in (job.metadata or {}).items():
            container.metadata[key] = value
        stream = container.add_stream(job.encoder, rate=job.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        ctx = stream.codec_context
        rgb = pix_fmt.startswith("gbr")
        # Tag BT.709 and convert with it: players assume 709 for HD and would shift colours otherwise.
        ctx.color_primaries, ctx.color_trc = _BT709, _BT709
        ctx.colorspace = _SPC_RGB if rgb else _BT709
        ctx.color_range = _RANGE_JPEG if rgb else _RANGE_MPEG
        for key, value in attrs.items():
            setattr(ctx, key, value)
        stream.options = options

        audio = _AudioWriter(container, job, len(job.order)) if job.audio is not None else None
        job.has_audio = audio is not None

        bits = 16 if _is_high_bit(pix_fmt) else 8
        src_format = "rgb24" if bits == 8 else "rgb48le"
        convert = {"format": pix_fmt, "interpolation": Interpolation.BICUBIC | Interpolation.ACCURATE_RND}
        if not rgb:
            convert.update(dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
        reformatter = VideoReformatter()  # one scaler context for the whole clip instead of one per frame
        pts = 0
        for chunk in iter_chunks(job.frames, job.order, job.options.chunk_size, height, width, bits):
            for pixels in chunk:
                frame = reformatter.reformat(av.VideoFrame.from_ndarray(pixels, format=src_format), **convert)
                frame.pts = pts
                pts += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
            if audio is not None:
                audio.write_until(Fraction(pts) / job.fps)
            job.progress.advance(len(chunk))
        for packet in stream.encode(None):
            container.mux(packet)
        if audio is not None:
            audio.finish()
        container.close()
    except BaseException:
        with suppress(Exception):
            container.close()
        raise
    return width, height
