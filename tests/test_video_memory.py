"""The writer never holds more than a chunk of converted frames, pingpong included.

Three angles: a spy on the converter (chunk sizes, and that it always reads the caller's tensor rather than a
concatenated copy), tracemalloc (numpy reports its buffers to it; torch and FFmpeg do not, so it isolates our
integer copies), and the process's peak RSS in a fresh interpreter (Linux only).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch

import vramwise.video as vv
from vramwise.video import frames as frames_module

AVAILABLE = vv.available_formats()
FORMATS = [
    f for f in ("video/h264-mp4", "video/vp9-webm", "image/gif", "image/webp", "image/png-frames") if f in AVAILABLE
]


def clip(count: int, size: int = 64) -> torch.Tensor:
    ramp = torch.linspace(0, 1, size)
    base = torch.stack(torch.broadcast_tensors(ramp.view(1, -1), ramp.view(-1, 1), 0.5 * ramp.view(1, -1)), -1)
    return (base.unsqueeze(0) * torch.linspace(0.3, 1, count).view(count, 1, 1, 1)).contiguous()


@pytest.mark.parametrize("format_id", FORMATS)
def test_converter_sees_at_most_a_chunk_of_the_original_tensor(format_id, tmp_path, monkeypatch):
    calls = []
    real = frames_module.convert

    def spy(frames, indices, *args, **kwargs):
        calls.append((len(indices), frames.untyped_storage().data_ptr()))
        return real(frames, indices, *args, **kwargs)

    monkeypatch.setattr(frames_module, "convert", spy)
    source = clip(21)
    options = vv.EncodeOptions(chunk_size=4, pingpong=True)
    result = vv.encode_video(source, tmp_path / f"a{vv.get_format(format_id).extension}", format_id, 8, options)
    assert result.frame_count == 40
    assert max(n for n, _ in calls) <= 4
    assert {ptr for _, ptr in calls} == {source.untyped_storage().data_ptr()}
    converted = sum(n for n, _ in calls)
    assert converted == 40 + (21 if format_id == "image/gif" else 0)  # gif: one extra pass for the palette


@pytest.mark.parametrize("format_id", FORMATS)
def test_integer_buffers_stay_chunk_sized(format_id, tmp_path):
    source = clip(48, 96)
    frame_bytes = 96 * 96 * 3
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        vv.encode_video(
            source,
            tmp_path / f"a{vv.get_format(format_id).extension}",
            format_id,
            8,
            vv.EncodeOptions(chunk_size=4, pingpong=True),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole_clip = frame_bytes * (2 * 48 - 2)
    assert peak < 4 * frame_bytes * 3 + 512 * 1024, f"peak {peak} bytes"
    assert peak < whole_clip / 4


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, vramwise.video as vv

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    out_dir, format_id, frames, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ext = vv.get_format(format_id).extension
    clip = torch.empty(frames, size, size, 3, dtype=torch.float32)
    ramp = torch.linspace(0, 1, size)
    for i in range(frames):  # filled in place: no clip-sized temporaries before the measurement
        clip[i, ..., 0] = (ramp.view(1, -1) + i / frames) % 1
        clip[i, ..., 1] = ramp.view(-1, 1)
        clip[i, ..., 2] = 0.5
    vv.encode_video(clip[:2], out_dir + "/warm" + ext, format_id, 16)  # load codecs first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = hwm()
    fast = {"preset": "ultrafast"} if ext == ".mp4" else {"compression_level": "0"}
    options = vv.EncodeOptions(pingpong=True, chunk_size=8, encoder_options=fast)
    vv.encode_video(clip, out_dir + "/big" + ext, format_id, 16, options)
    print(hwm() - before)
    """
)

# (format, source frames, size): pingpong doubles the output, so a writer that copied the clip or kept its
# output frames would grow 4x past the bar. One format suffices: the spy test shows all share the chunk path.
RSS_CASES = [("video/h264-mp4", 96, 384)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("format_id,frames,size", [c for c in RSS_CASES if c[0] in AVAILABLE])
def test_peak_rss_growth_is_far_below_one_uint8_copy(format_id, frames, size, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), format_id, str(frames), str(size)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0 and "clear_refs" in run.stderr:
        pytest.skip("cannot reset the peak RSS counter here")
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.strip().splitlines()[-1])
    uint8_clip = frames * size * size * 3
    assert growth < uint8_clip / 2, f"peak RSS grew {growth / 2**20:.1f} MiB, clip as uint8 is {uint8_clip / 2**20:.1f}"


def test_free_heap_is_released_after_every_chunk(monkeypatch):
    calls = []
    monkeypatch.setattr(frames_module, "release_free_heap", lambda: calls.append(1))
    chunks = sum(1 for _ in frames_module.iter_chunks(clip(20, 8), range(20), 8, 8, 8))
    assert chunks == 3 and len(calls) == 3


def test_release_free_heap_is_safe_to_call(monkeypatch):
    """glibc: malloc_trim(0) is called (the real one, here, when the C library has it); without it, nothing."""
    calls = []
    monkeypatch.setattr(frames_module, "_malloc_trim", lambda: calls.append)
    frames_module.release_free_heap()
    assert calls == [0]
    monkeypatch.setattr(frames_module, "_malloc_trim", lambda: None)
    frames_module.release_free_heap()
    assert calls == [0]
    monkeypatch.undo()
    trim = frames_module._malloc_trim()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert trim is not None, "glibc Linux exposes malloc_trim"
        assert trim(0) in (0, 1)  # 1: memory was released, 0: none to release
    frames_module.release_free_heap()
