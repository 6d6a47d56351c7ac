"""resolve_output_path: sub-folders, refusal of escapes, counters that never overwrite."""

from __future__ import annotations

import os

import pytest
import torch

import vramwise.video as vv
from vramwise.errors import InputError
from vramwise.video.paths import publish, resolve_output_path


def test_subfolders_created_and_counter_starts_at_one(tmp_path):
    full, subfolder, filename = resolve_output_path(str(tmp_path), "clips/day1/cat", ".mp4")
    assert (subfolder, filename) == ("clips/day1", "cat_00001.mp4")
    assert full == os.path.join(os.path.realpath(tmp_path), "clips", "day1", "cat_00001.mp4")
    assert os.path.isdir(os.path.dirname(full)) and not os.path.exists(full)


def test_extension_without_dot_and_folder_outputs(tmp_path):
    assert resolve_output_path(str(tmp_path), "a", "gif")[2] == "a_00001.gif"
    assert resolve_output_path(str(tmp_path), "a", "")[2] == "a_00001"


def test_counter_continues_after_highest_and_ignores_other_names(tmp_path):
    for name in (
        "cat_00001.mp4",
        "cat_00007.webm",
        "cat_00003",
        "cat_extra_00009.mp4",
        "catalog_00020.mp4",
        "cat_12.mp4",
    ):
        (tmp_path / name).write_bytes(b"")
    assert resolve_output_path(str(tmp_path), "cat", ".mp4")[2] == "cat_00008.mp4"


def test_never_overwrites(tmp_path):
    clip = torch.rand(2, 16, 16, 3)
    first = vv.save_video(clip, str(tmp_path), "x", "image/gif", 8)
    before = os.path.getsize(first.path), os.path.getmtime(first.path)
    second = vv.save_video(clip, str(tmp_path), "x", "image/gif", 8)
    assert (first.filename, second.filename) == ("x_00001.gif", "x_00002.gif")
    assert (os.path.getsize(first.path), os.path.getmtime(first.path)) == before
    with pytest.raises(FileExistsError):
        vv.encode_video(clip, first.path, "image/gif", 8)
    assert sorted(os.listdir(tmp_path)) == ["x_00001.gif", "x_00002.gif"]


def test_publish_refuses_a_name_taken_meanwhile(tmp_path):
    temp, final = tmp_path / ".t.partial", tmp_path / "a_00001.mp4"
    temp.write_bytes(b"new")
    final.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        publish(str(temp), str(final))
    assert final.read_bytes() == b"old"


@pytest.mark.parametrize(
    "prefix",
    [
        "../evil",
        "a/../../evil",
        "a/..",
        "/etc/evil",
        "\\\\server\\share\\x",
        "C:\\evil",
        "C:evil",
        "",
        "  ",
        "dir/",
        "a\x00b",
        "a|b",
    ],
)
def test_bad_prefixes_refused(prefix, tmp_path):
    base = tmp_path / "out"
    base.mkdir()
    with pytest.raises(ValueError, match="filename_prefix") as err:
        resolve_output_path(str(base), prefix, ".mp4")
    assert "Fix:" in str(err.value)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(base) == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_escape_refused(tmp_path):
    base, outside = tmp_path / "out", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    try:
        (base / "link").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("cannot create symlinks here")
    with pytest.raises(ValueError, match="filename_prefix"):
        resolve_output_path(str(base), "link/sub/clip", ".mp4")
    assert os.listdir(outside) == []  # nothing created through the link


def test_symlink_inside_base_is_fine(tmp_path):
    (tmp_path / "real").mkdir()
    try:
        (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    except OSError:
        pytest.skip("cannot create symlinks here")
    full, subfolder, _ = resolve_output_path(str(tmp_path), "alias/clip", ".mp4")
    assert subfolder == "alias" and os.path.dirname(full) == str(tmp_path.resolve() / "alias")


@pytest.mark.parametrize("prefix", ["x" * 300, "x" * 300 + "/clip", "ok/" + "é" * 200])
def test_names_longer_than_the_file_system_allows_are_input_errors(prefix, tmp_path):
    with pytest.raises(InputError) as err:
        resolve_output_path(str(tmp_path), prefix, ".mp4")
    assert err.value.input_name == "filename_prefix" and "at most" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing created for a refused prefix


def test_the_longest_accepted_name_can_be_written_with_its_temp_sibling(tmp_path):
    from vramwise.video.paths import temp_path_for

    for length in range(200, 256):
        try:
            full, _, _ = resolve_output_path(str(tmp_path), "n" * length, ".webm")
        except InputError:
            break
    assert length - 1 > 200
    full, _, _ = resolve_output_path(str(tmp_path), "n" * (length - 1), ".webm")
    with open(temp_path_for(full), "wb") as f:  # OSError 36 here if the limit were too loose
        f.write(b"x")
    open(full, "wb").close()
