"""Behaviour around the encoders: pingpong, progress, cancel and cleanup, audio, loops, input shapes."""

from __future__ import annotations

import math
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

import vramwise.video as vv
from vramwise.video.errors import InputError

AVAILABLE = vv.available_formats()
H264 = "video/h264-mp4"
needs_h264 = pytest.mark.skipif(H264 not in AVAILABLE, reason="no H.264 encoder")


def clip(frames: int = 17, height: int = 48, width: int = 64) -> torch.Tensor:
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width, 1)
    y = torch.linspace(0, 1, height).view(1, height, 1, 1)
    c = torch.tensor([0.0, 2.0, 4.0]).view(1, 1, 1, 3)
    return (0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.5 * y) + c + 0.3 * t)).contiguous()


def leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize(
    "format_id", [f for f in (H264, "image/gif", "image/webp", "image/png-frames") if f in AVAILABLE]
)
def test_pingpong_frame_count(format_id, tmp_path):
    frames = clip(9)
    path = tmp_path / f"a{vv.get_format(format_id).extension}"
    options = vv.EncodeOptions(pingpong=True, lossless=format_id == "image/webp")
    result = vv.encode_video(frames, path, format_id, 8, options)
    assert result.frame_count == vv.probe(result.path).frame_count == 2 * 9 - 2
    if format_id in ("image/webp", "image/png-frames"):  # exact formats: the way back mirrors the way out
        decoded = vv.read_frames(result.path)
        assert np.array_equal(decoded[9], decoded[7]) and np.array_equal(decoded[15], decoded[1])


def test_progress_reported_per_chunk(tmp_path):
    calls = []
    vv.encode_video(
        clip(20),
        tmp_path / "seq",
        "image/png-frames",
        8,
        vv.EncodeOptions(chunk_size=8),
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(8, 20), (16, 20), (20, 20)]


def test_gif_progress_includes_palette_pass(tmp_path):
    calls = []
    vv.encode_video(
        clip(5),
        tmp_path / "a.gif",
        "image/gif",
        8,
        vv.EncodeOptions(chunk_size=4, pingpong=True),
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (5 + 8, 5 + 8) and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("format_id", AVAILABLE)
def test_cancel_removes_partial_output(format_id, tmp_path):
    checks = []

    def should_cancel() -> bool:
        checks.append(1)
        return len(checks) >= 3  # after the first chunk has been written

    with pytest.raises(vv.EncodeCancelled):
        vv.encode_video(
            clip(40),
            tmp_path / f"a{vv.get_format(format_id).extension}",
            format_id,
            16,
            vv.EncodeOptions(chunk_size=8),
            should_cancel=should_cancel,
        )
    assert leftovers(tmp_path) == []


def test_exception_from_progress_callback_propagates_and_cleans(tmp_path):
    class Interrupted(Exception):
        pass

    def on_progress(done: int, total: int) -> None:
        if done >= 16:
            raise Interrupted

    with pytest.raises(Interrupted):
        vv.encode_video(clip(40), tmp_path / "seq", "image/png-frames", 16, on_progress=on_progress)
    assert leftovers(tmp_path) == []


@needs_h264
def test_encoder_error_cleans_up(tmp_path):
    options = vv.EncodeOptions(encoder_options={"preset": "no-such-preset"})
    with pytest.raises(av.error.FFmpegError):
        vv.encode_video(clip(4), tmp_path / "a.mp4", H264, 16, options)
    assert leftovers(tmp_path) == []


def test_input_shapes(tmp_path):
    rgba = torch.cat([clip(3), torch.zeros(3, 48, 64, 1)], dim=-1)
    out = vv.encode_video(rgba, tmp_path / "rgba", "image/png-frames", 8)
    assert np.array_equal(vv.read_frames(out.path), (clip(3) * 255 + 0.5).to(torch.uint8).numpy())
    single = vv.encode_video(clip(1)[0], tmp_path / "one", "image/png-frames", 8)
    assert single.frame_count == 1
    as_numpy = vv.encode_video(clip(2).numpy(), tmp_path / "np", "image/png-frames", 8)
    assert as_numpy.frame_count == 2
    with pytest.raises(InputError, match="images"):
        vv.encode_video(torch.zeros(2, 8, 8), tmp_path / "bad", "image/png-frames", 8)
    with pytest.raises(InputError, match="frame_rate"):
        vv.encode_video(clip(2), tmp_path / "bad", "image/png-frames", 0)


@pytest.mark.parametrize(
    "format_id,plays,stored", [("image/gif", 0, 0), ("image/gif", 3, 2), ("image/webp", 0, 0), ("image/webp", 3, 3)]
)
def test_loop_count(format_id, plays, stored, tmp_path):
    result = vv.encode_video(
        clip(4), tmp_path / f"a{vv.get_format(format_id).extension}", format_id, 8, vv.EncodeOptions(loop_count=plays)
    )
    with Image.open(result.path) as im:
        assert im.info.get("loop") == stored


def test_gif_play_once_has_no_loop_block(tmp_path):
    result = vv.encode_video(clip(4), tmp_path / "a.gif", "image/gif", 8, vv.EncodeOptions(loop_count=1))
    with open(result.path, "rb") as f:
        assert b"NETSCAPE2.0" not in f.read()


def test_gif_refuses_rates_browsers_cannot_play(tmp_path):
    with pytest.raises(InputError, match="frame_rate"):
        vv.encode_video(clip(3), tmp_path / "a.gif", "image/gif", 60)


def audio(seconds: float, rate: int = 44100, channels: int = 2) -> dict:
    n = int(seconds * rate)
    tone = torch.sin(torch.arange(n) / rate * 2 * math.pi * 440) * 0.3
    return {"waveform": tone.repeat(1, channels, 1), "sample_rate": rate}


def audio_seconds(path: str) -> tuple[str, int, float]:
    with av.open(path) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, stream.codec_context.channels, samples / stream.codec_context.sample_rate


AUDIO_CASES = [
    ("video/h264-mp4", None, "aac"),
    ("video/vp9-webm", None, "opus"),
    ("video/prores-mov", None, "aac"),
    ("video/prores-mov", "pcm", "pcm_s16le"),
]


@pytest.mark.parametrize("format_id,codec_choice,codec", [c for c in AUDIO_CASES if c[0] in AVAILABLE])
def test_audio_muxed(format_id, codec_choice, codec, tmp_path):
    result = vv.encode_video(
        clip(16),
        tmp_path / f"a{vv.get_format(format_id).extension}",
        format_id,
        16,
        vv.EncodeOptions(audio_codec=codec_choice),
        audio=audio(1.0),
    )
    assert result.has_audio and vv.probe(result.path).has_audio
    name, channels, seconds = audio_seconds(result.path)
    assert (name, channels) == (codec, 2)
    assert abs(seconds - 1.0) < 0.06  # codec priming/padding only


@needs_h264
def test_audio_trimmed_to_video_and_mono_kept(tmp_path):
    result = vv.encode_video(clip(16), tmp_path / "a.mp4", H264, 16, audio=audio(3.0, 48000, 1))
    assert any("audio trimmed" in note for note in result.notes)
    _, channels, seconds = audio_seconds(result.path)
    assert channels == 1 and abs(seconds - 1.0) < 0.06


def test_audio_ignored_with_a_note_where_the_format_has_none(tmp_path):
    result = vv.encode_video(clip(3), tmp_path / "a.gif", "image/gif", 8, audio=audio(1.0))
    assert not result.has_audio and any("audio ignored" in note for note in result.notes)


@needs_h264
def test_bad_audio_refused_and_cleaned(tmp_path):
    with pytest.raises(InputError, match="audio"):
        vv.encode_video(clip(3), tmp_path / "a.mp4", H264, 8, audio={"samples": 1})
    assert leftovers(tmp_path) == []


def test_save_video_result_fields(tmp_path):
    result = vv.save_video(clip(3), str(tmp_path), "sub/run", "image/png-frames", 12)
    assert (result.subfolder, result.filename) == ("sub", "run_00001")
    assert result.preview_path == os.path.join(result.path, "frame_00001.png")
    assert os.path.isfile(result.preview_path)
    assert (result.width, result.height, result.frame_count, result.fps) == (64, 48, 3, 12)


def test_auto_means_the_format_default(tmp_path):
    options = vv.EncodeOptions(pix_fmt="auto", prores_profile="auto", audio_codec="auto")
    result = vv.encode_video(clip(2), tmp_path / "seq", "image/png-frames", 8, options)
    assert result.pix_fmt == "rgb24" and result.notes == []
