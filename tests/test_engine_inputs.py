"""Input rules and image fitting, without a server."""

from __future__ import annotations

import pytest
import torch

from vramwise.errors import InputError
from vramwise.families.wan import Wan21I2V, Wan22I2VA14B, Wan22TI2V5B
from vramwise.image_prep import ResizeMode, first_frame, fit_image
from vramwise.validation import validate_generation

GOOD = dict(width=832, height=480, num_frames=81, steps=30, cfg=5.0)


@pytest.mark.parametrize("change", [{}, {"num_frames": 1}, {"width": 16, "height": 16}, {"steps": 1}, {"cfg": 1.0}],
                         ids=["defaults", "one-frame", "smallest-size", "one-step", "cfg-off"])
def test_valid_request_passes(change):
    """Valid values, the edges included, pass; the same request one step past an edge is refused."""
    assert validate_generation(Wan21I2V(), **{**GOOD, **change}) is None
    past = {"num_frames": 0, "width": 8, "height": 8, "steps": 0, "cfg": -1.0}
    for name in change:
        with pytest.raises(InputError) as err:
            validate_generation(Wan21I2V(), **{**GOOD, **change, name: past[name]})
        assert err.value.input_name in change


@pytest.mark.parametrize(
    "change,input_name,fix",
    [
        ({"num_frames": 80}, "num_frames", "use 77 or 81"),
        ({"num_frames": 2}, "num_frames", "use 1 or 5"),
        ({"width": 840}, "width", "use 832 or 848"),
        ({"height": 8}, "height", "use 16 or 32"),
        ({"steps": 0}, "steps", "set steps to 1 or more"),
        ({"cfg": -1.0}, "cfg", "1.0 to disable"),
    ],
)
def test_bad_values_name_the_input_and_the_nearest_valid_values(change, input_name, fix):
    with pytest.raises(InputError) as err:
        validate_generation(Wan21I2V(), **{**GOOD, **change})
    assert err.value.input_name == input_name
    assert fix in str(err.value)


def test_ti2v_needs_multiples_of_32():
    with pytest.raises(InputError, match="multiple of 32"):
        validate_generation(Wan22TI2V5B(), **{**GOOD, "width": 848})
    validate_generation(Wan22TI2V5B(), **{**GOOD, "width": 1280, "height": 704})


def test_end_image_only_for_first_last_frame_models():
    with pytest.raises(InputError, match="end_image"):
        validate_generation(Wan21I2V(), **GOOD, has_end_image=True)
    validate_generation(Wan22I2VA14B(), **GOOD, has_end_image=True)


def test_first_frame_of_a_batch_is_used_and_said():
    batch = torch.stack([torch.zeros(8, 8, 3), torch.ones(8, 8, 3)])
    frame, note = first_frame(batch)
    assert torch.equal(frame, torch.zeros(8, 8, 3))
    assert "batch of 2" in note


def test_missing_or_malformed_image_is_an_input_error():
    with pytest.raises(InputError, match="image: no image is connected"):
        first_frame(None)
    with pytest.raises(InputError, match="IMAGE tensor"):
        first_frame(torch.zeros(2, 3))


def test_alpha_is_dropped_and_grey_is_expanded():
    frame, _ = first_frame(torch.rand(1, 4, 4, 4))
    assert frame.shape == (4, 4, 3)
    frame, _ = first_frame(torch.rand(1, 4, 4, 1))
    assert frame.shape == (4, 4, 3)


def test_crop_fills_the_frame_and_keeps_the_centre():
    img = torch.zeros(100, 200, 3)
    img[:, 50:150] = 1.0  # white centre band, black sides
    out = fit_image(img, 64, 64, ResizeMode.CROP)
    assert out.size == (64, 64)
    assert min(out.getpixel((0, 32))) > 200 and min(out.getpixel((63, 32))) > 200


def test_pad_keeps_the_whole_image_with_black_bars():
    img = torch.ones(100, 200, 3)
    out = fit_image(img, 64, 64, ResizeMode.PAD)
    assert out.size == (64, 64)
    assert out.getpixel((32, 2)) == (0, 0, 0)  # bar above
    assert min(out.getpixel((32, 32))) > 250  # image in the middle


def test_a_decoded_last_frame_starts_the_next_segment_unchanged():
    """Chaining: the last frame of a decoded clip, fed back at the same size, is neither cropped nor resampled."""
    import numpy as np

    frames = torch.rand(5, 48, 64, 3, generator=torch.Generator().manual_seed(0))  # as VRAMWise VAE Decode outputs
    last = frames[-1:]  # core Image From Batch, batch_index 4
    frame, note = first_frame(last, "image")
    assert note is None
    for mode in ResizeMode:
        got = np.asarray(fit_image(frame, 64, 48, mode))
        assert np.array_equal(got, (last[0].numpy() * 255).round().astype("uint8"))


def test_a_whole_clip_given_as_the_start_image_says_how_to_take_its_last_frame():
    _frame, note = first_frame(torch.rand(81, 8, 8, 3), "image")
    assert "first one is used" in note and "Image From Batch, batch_index 80" in note


# --- file inputs: only files the input's listing offers (vramwise/model_files.py) ---
from vramwise.model_files import list_model_files, resolve_model_file  # noqa: E402

_EXT = (".safetensors", ".gguf")


def _models_root(tmp_path):
    root = tmp_path / "models" / "diffusion_models"
    (root / "wan").mkdir(parents=True)
    (root / "wan" / "a.safetensors").write_bytes(b"x")
    (root / "b.gguf").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "real.safetensors").write_bytes(b"x")
    (root / "linked.safetensors").symlink_to(outside / "real.safetensors")
    return root, outside


def _refusal(name, roots):
    with pytest.raises(InputError) as err:
        resolve_model_file("diffusion_model", name, roots, _EXT, "models/diffusion_models")
    assert err.value.input_name == "diffusion_model"
    return str(err.value)


def test_listed_files_resolve_including_a_file_linked_from_elsewhere(tmp_path):
    root, outside = _models_root(tmp_path)
    assert list_model_files([root, tmp_path / "missing"], _EXT) == ["b.gguf", "linked.safetensors", "wan/a.safetensors"]
    assert resolve_model_file("diffusion_model", "wan/a.safetensors", [root], _EXT, "m") == root / "wan" / "a.safetensors"
    linked = resolve_model_file("diffusion_model", "linked.safetensors", [root], _EXT, "m")
    assert linked.resolve() == (outside / "real.safetensors").resolve()


def test_hostile_file_names_get_one_message_whether_or_not_the_path_exists(tmp_path):
    root, outside = _models_root(tmp_path)
    depth = len(root.parts)
    messages = {
        _refusal(name, [root])
        for name in [
            "/etc/passwd", "/etc/no-such-file-here", "../" * depth + "etc/passwd", "../" * depth + "etc/none",
            str(outside / "real.safetensors"), str(outside / "gone.safetensors"), "../../elsewhere/real.safetensors",
            "wan/../b.gguf", "notes.txt", "", "wan", "loop/wan/a.safetensors",
        ]
    }
    assert len(messages) == 1
    (message,) = messages
    assert "pick a file from the list" in message and "models/diffusion_models" in message
    assert "passwd" not in message and "elsewhere" not in message


def test_a_symlink_loop_in_a_models_folder_lists_each_file_once(tmp_path):
    root, _ = _models_root(tmp_path)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert list_model_files([root], _EXT) == ["b.gguf", "linked.safetensors", "wan/a.safetensors"]
    _refusal("loop/b.gguf", [root])


def test_unknown_resize_and_tiling_modes_name_the_input_and_the_choices():
    from vramwise.decode import TilingMode

    with pytest.raises(InputError, match=r"^resize_mode: 'stretch'.*pick one of crop, pad"):
        ResizeMode.parse("stretch")
    with pytest.raises(InputError, match=r"^tiling: 'bogus'.*pick one of auto, on, off"):
        TilingMode.parse("bogus")
    assert ResizeMode.parse("pad") is ResizeMode.PAD and TilingMode.parse("on") is TilingMode.ON
