"""Every available format round-trips: frame count, rate, size, fidelity; plus the registry's contract."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import vramwise.video as vv
from vramwise.video import formats
from vramwise.video.errors import FormatUnavailableError, InputError

AVAILABLE = vv.available_formats()
VIDEO = [f for f in AVAILABLE if f.startswith("video/")]


def smooth_clip(frames: int = 17, height: int = 48, width: int = 64) -> torch.Tensor:
    """Gradients drifting a little each frame: what a codec should handle well."""
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (1.2 * x + 0.05 * t))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (0.9 * y - 0.04 * t))
    b = 0.3 + 0.5 * x * y + 0.0 * t
    return torch.stack(torch.broadcast_tensors(r, g, b), dim=-1).contiguous()


def reference(clip: torch.Tensor) -> np.ndarray:
    return (clip * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def test_registry_ids_are_stable_and_probed():
    assert list(vv.FORMATS) == [
        "video/h264-mp4",
        "video/h265-mp4",
        "video/vp9-webm",
        "video/av1-webm",
        "video/av1-mp4",
        "video/prores-mov",
        "image/gif",
        "image/webp",
        "image/png-frames",
    ]
    assert set(AVAILABLE) <= set(vv.FORMATS)
    assert "image/png-frames" in AVAILABLE and "image/gif" in AVAILABLE  # FFmpeg always has these


def test_missing_encoder_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(formats, "has_encoder", lambda name: name != "libx264" and name != "libopenh264")
    assert "video/h264-mp4" not in vv.available_formats()
    with pytest.raises(FormatUnavailableError) as err:
        vv.encode_video(smooth_clip(2), tmp_path / "a.mp4", "video/h264-mp4", 16)
    message = str(err.value)
    assert "video/h264-mp4" in message and "libx264" in message and "Fix:" in message
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_bad_pix_fmt(tmp_path):
    with pytest.raises(InputError, match="format"):
        vv.encode_video(smooth_clip(2), tmp_path / "a.mp4", "video/mpeg2", 16)
    with pytest.raises(InputError, match="pix_fmt"):
        vv.encode_video(smooth_clip(2), tmp_path / "a.mp4", "video/h264-mp4", 16, vv.EncodeOptions(pix_fmt="rgb565"))


@pytest.mark.parametrize("format_id", AVAILABLE)
@pytest.mark.parametrize("size", [(48, 64), (49, 65)], ids=["64x48", "65x49"])
def test_round_trip(format_id, size, tmp_path):
    height, width = size
    clip = smooth_clip(17, height, width)
    result = vv.encode_video(clip, tmp_path / f"out{vv.get_format(format_id).extension}", format_id, 16)
    info = vv.probe(result.path)
    decoded = vv.read_frames(result.path)

    assert result.frame_count == info.frame_count == len(decoded) == 17
    assert (info.width, info.height) == (result.width, result.height)
    assert result.width >= width and result.height >= height
    if format_id.startswith("video/"):
        assert info.fps == Fraction(16)
    elif format_id != "image/png-frames":
        assert abs(float(info.fps) - 16) < 0.1  # GIF/WebP keep per-frame delays in 1/100 s or ms

    quality = psnr(decoded[:, :height, :width], reference(clip))
    floor = {"image/gif": 25, "image/png-frames": math.inf, "video/prores-mov": 45}.get(format_id, 35)
    assert quality >= floor, f"{format_id}: {quality:.1f} dB"


@pytest.mark.skipif("video/h264-mp4" not in AVAILABLE, reason="no H.264 encoder")
def test_h264_default_crf_psnr_on_larger_clip(tmp_path):
    clip = smooth_clip(17, 144, 256)
    result = vv.encode_video(clip, tmp_path / "a.mp4", "video/h264-mp4", 24)
    assert psnr(vv.read_frames(result.path), reference(clip)) >= 35


@pytest.mark.parametrize(
    "format_id", [f for f in ("video/h264-mp4", "video/h265-mp4", "video/prores-mov") if f in AVAILABLE]
)
def test_ntsc_rate_is_exact(format_id, tmp_path):
    ext = vv.get_format(format_id).extension
    result = vv.encode_video(smooth_clip(5), tmp_path / f"a{ext}", format_id, 23.976)
    assert result.fps == Fraction(24000, 1001)
    assert vv.probe(result.path).fps == Fraction(24000, 1001)


@pytest.mark.skipif("video/vp9-webm" not in AVAILABLE, reason="no VP9 encoder")
def test_webm_rate_close(tmp_path):
    result = vv.encode_video(smooth_clip(9), tmp_path / "a.webm", "video/vp9-webm", "24000/1001")
    assert abs(float(vv.probe(result.path).fps) - 24000 / 1001) < 0.01  # Matroska keeps milliseconds


def test_odd_size_padded_by_edge_replication(tmp_path):
    format_id = VIDEO[0]
    clip = smooth_clip(3, 49, 65)
    result = vv.encode_video(clip, tmp_path / "a.mp4", format_id, 16, vv.EncodeOptions(pix_fmt="yuv420p"))
    assert (result.width, result.height) == (66, 50)
    assert any("padded 65x49 to 66x50" in note for note in result.notes)
    decoded = vv.read_frames(result.path).astype(int)
    # the added column/row repeat the edge (lossy, so compare loosely), they are not black
    assert np.abs(decoded[:, :49, 65] - decoded[:, :49, 64]).mean() < 4
    assert np.abs(decoded[:, 49, :65] - decoded[:, 48, :65]).mean() < 4


def test_444_keeps_odd_size(tmp_path):
    result = vv.encode_video(
        smooth_clip(3, 49, 65), tmp_path / "a.mp4", VIDEO[0], 16, vv.EncodeOptions(pix_fmt="yuv444p")
    )
    assert (result.width, result.height) == (65, 49)
    assert not any("padded" in note for note in result.notes)


LOSSLESS = [
    ("video/h264-mp4", "yuv444p10le", 50),
    ("video/h265-mp4", "gbrp", 50),
    ("video/vp9-webm", "gbrp", 50),
    ("image/webp", None, math.inf),
]


@pytest.mark.parametrize("format_id,pix_fmt,floor", [c for c in LOSSLESS if c[0] in AVAILABLE])
def test_lossless_modes(format_id, pix_fmt, floor, tmp_path):
    clip = smooth_clip(6, 48, 64)
    ext = vv.get_format(format_id).extension
    options = vv.EncodeOptions(lossless=True, pix_fmt=pix_fmt)
    result = vv.encode_video(clip, tmp_path / f"a{ext}", format_id, 16, options)
    decoded = vv.read_frames(result.path)
    assert len(decoded) == 6
    assert psnr(decoded, reference(clip)) >= floor


def test_png_16_bit_is_exact(tmp_path):
    clip = smooth_clip(3, 20, 30)
    result = vv.encode_video(clip, tmp_path / "seq", "image/png-frames", 16, vv.EncodeOptions(pix_fmt="rgb48"))
    decoded = vv.read_frames(result.path)
    assert decoded.dtype == np.uint16
    assert np.array_equal(decoded, (clip * 65535 + 0.5).clamp(0, 65535).to(torch.int32).numpy())


@pytest.mark.skipif("video/h264-mp4" not in AVAILABLE, reason="no H.264 encoder")
def test_ten_bit_h264(tmp_path):
    result = vv.encode_video(
        smooth_clip(5), tmp_path / "a.mp4", "video/h264-mp4", 16, vv.EncodeOptions(pix_fmt="yuv420p10le")
    )
    import av

    with av.open(result.path) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"


@pytest.mark.skipif("video/h265-mp4" not in AVAILABLE, reason="no HEVC encoder")
def test_hevc_is_tagged_hvc1(tmp_path):
    result = vv.encode_video(smooth_clip(3), tmp_path / "a.mp4", "video/h265-mp4", 16)
    with open(result.path, "rb") as f:
        head = f.read()
    assert b"hvc1" in head and b"hev1" not in head


@pytest.mark.skipif("video/prores-mov" not in AVAILABLE, reason="no ProRes encoder")
def test_prores_4444_profile(tmp_path):
    import av

    result = vv.encode_video(
        smooth_clip(3), tmp_path / "a.mov", "video/prores-mov", 16, vv.EncodeOptions(pix_fmt="yuv444p10le")
    )
    with av.open(result.path) as container:
        assert container.streams.video[0].codec_context.codec_tag == "ap4h"
    with pytest.raises(InputError, match="prores_profile"):
        vv.encode_video(
            smooth_clip(2), tmp_path / "b.mov", "video/prores-mov", 16, vv.EncodeOptions(prores_profile="4444")
        )


def test_lossless_refused_where_the_encoder_has_none(tmp_path):
    if "video/prores-mov" not in AVAILABLE:
        pytest.skip("no ProRes encoder")
    with pytest.raises(InputError, match="lossless"):
        vv.encode_video(smooth_clip(2), tmp_path / "a.mov", "video/prores-mov", 16, vv.EncodeOptions(lossless=True))
    assert list(tmp_path.iterdir()) == []


def test_package_does_not_import_comfyui():
    import os
    import subprocess
    import sys

    roots = "('comfy', 'comfy_api', 'folder_paths', 'nodes')"
    code = f"import sys, vramwise.video; print(sorted(m for m in sys.modules if m.split('.')[0] in {roots}))"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.strip() == "[]"
