"""Frame conversion, rates and ordering: the pure helpers under every encoder."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from vramwise.errors import InputError
from vramwise.video.formats import chroma_subsampling
from vramwise.video.frames import as_frames, convert, frame_order, iter_chunks, padded_size, to_fraction


@pytest.mark.parametrize(
    "given,expected",
    [
        (16, Fraction(16)),
        (16.0, Fraction(16)),
        (12.5, Fraction(25, 2)),
        (23.976, Fraction(24000, 1001)),
        (29.97, Fraction(30000, 1001)),
        (59.94, Fraction(60000, 1001)),
        ("24000/1001", Fraction(24000, 1001)),
        (" 8 ", Fraction(8)),
        (Fraction(30000, 1001), Fraction(30000, 1001)),
    ],
)
def test_to_fraction(given, expected):
    assert to_fraction(given) == expected


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "fast", 5000])
def test_to_fraction_rejects(bad):
    with pytest.raises(InputError, match="frame_rate"):
        to_fraction(bad)


def test_frame_order():
    assert frame_order(4, False) == [0, 1, 2, 3]
    assert frame_order(4, True) == [0, 1, 2, 3, 2, 1]
    assert len(frame_order(17, True)) == 2 * 17 - 2
    assert frame_order(2, True) == [0, 1] and frame_order(1, True) == [0]


def test_as_frames_shapes_without_copying():
    clip = torch.rand(3, 4, 5, 4)
    view = as_frames(clip)
    assert view.shape == (3, 4, 5, 4) and view.data_ptr() == clip.data_ptr()
    assert as_frames(torch.rand(4, 5, 3)).shape == (1, 4, 5, 3)
    assert as_frames(np.zeros((2, 4, 5, 3), np.float32)).shape == (2, 4, 5, 3)
    for bad in (torch.rand(2, 4, 5, 1), torch.rand(0, 4, 5, 3), torch.zeros(2, 4, 5, 3, dtype=torch.int64), "x"):
        with pytest.raises(InputError, match="images"):
            as_frames(bad)


def test_convert_rounds_clamps_and_drops_alpha():
    clip = torch.tensor(
        [[[[0.0, 1.0, 0.5, 0.3], [float("nan"), 7.0, -2.0, 0.0], [1 / 255, 0.499 / 255, 0.501 / 255, 1]]]]
    )
    out = convert(clip, [0], 1, 3)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3, 3)
    assert out[0, 0].tolist() == [[0, 255, 128], [0, 255, 0], [1, 0, 1]]
    assert convert(clip, [0], 1, 3, bits=16)[0, 0, 0].tolist() == [0, 65535, 32768]


def test_convert_pads_by_repeating_edges():
    clip = torch.rand(2, 3, 5, 3)
    out = convert(clip, [1, 0], 4, 6)
    ref = (clip * 255 + 0.5).to(torch.uint8).numpy()
    assert np.array_equal(out[0, :3, :5], ref[1]) and np.array_equal(out[1, :3, :5], ref[0])
    assert np.array_equal(out[:, :3, 5], out[:, :3, 4])
    assert np.array_equal(out[:, 3], out[:, 2])


def test_uint8_and_half_inputs():
    clip = torch.rand(2, 4, 4, 3)
    ref = convert(clip, [0, 1], 4, 4)
    assert np.abs(convert(clip.half(), [0, 1], 4, 4).astype(int) - ref).max() <= 1
    as_bytes = torch.from_numpy(ref)
    assert np.array_equal(convert(as_bytes, [0, 1], 4, 4), ref)
    assert np.array_equal(convert(as_bytes, [0, 1], 4, 4, bits=16), ref.astype(np.uint16) * 257)


def test_iter_chunks_sizes_and_order():
    clip = torch.rand(5, 2, 2, 3)
    chunks = [c.copy() for c in iter_chunks(clip, frame_order(5, True), 3, 2, 2)]  # the buffer is reused
    assert [len(c) for c in chunks] == [3, 3, 2]
    # order 0 1 2 | 3 4 3 | 2 1
    assert np.array_equal(chunks[1][2], chunks[1][0]) and np.array_equal(chunks[2][1], chunks[0][1])


@pytest.mark.parametrize(
    "pix_fmt,size",
    [
        ("yuv420p", (50, 66)),
        ("yuv420p10le", (50, 66)),
        ("yuv422p10le", (49, 66)),
        ("yuv444p", (49, 65)),
        ("gbrp", (49, 65)),
    ],
)
def test_padding_follows_chroma_subsampling(pix_fmt, size):
    assert padded_size(49, 65, chroma_subsampling(pix_fmt)) == size
