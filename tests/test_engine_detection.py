"""Family detection and model folder discovery, without a server."""

from __future__ import annotations

import json

import pytest

from vramwise.errors import ModelFolderError
from vramwise.families import ModelIndex, detect_family
from vramwise.model_folders import list_model_folders, resolve_model_folder


@pytest.mark.parametrize(
    "folder,family_id",
    [
        ("tiny-wan21-i2v", "wan2.1-i2v"),
        ("tiny-wan21-flf2v", "wan2.1-flf2v"),
        ("tiny-wan22-i2v-a14b", "wan2.2-i2v-a14b"),
        ("tiny-wan22-ti2v-5b", "wan2.2-ti2v-5b"),
    ],
)
def test_wan_variants_are_told_apart_by_their_configs(tiny_models_root, folder, family_id):
    assert detect_family(tiny_models_root / folder).id == family_id


@pytest.mark.parametrize("folder,experts", [("tiny-wan21-t2v", "one transformer"), ("tiny-wan22-t2v-a14b", "two experts")])
def test_text_to_video_folders_are_refused_with_the_configs_that_tell(tiny_models_root, folder, experts):
    with pytest.raises(ModelFolderError) as err:
        detect_family(tiny_models_root / folder)
    message = str(err.value)
    assert "WanPipeline" in message and "text-to-video" in message and experts in message
    assert "in_channels 16" in message and "expand_timesteps False" in message


def test_ti2v_5b_is_recognised_as_published_by_wanpipeline_and_expand_timesteps(tiny_models_root):
    index = json.loads((tiny_models_root / "tiny-wan22-ti2v-5b" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    assert detect_family(tiny_models_root / "tiny-wan22-ti2v-5b").id == "wan2.2-ti2v-5b"


def _copy_configs(src, dst, index_changes=None, transformer_changes=None):
    """The folder's json files only (detection reads nothing else), with edits."""
    for path in src.rglob("*.json"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text())
        if path.name == "model_index.json":
            data.update(index_changes or {})
        elif path.parent.name == "transformer":
            data.update(transformer_changes or {})
        target.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "index_changes,transformer_changes",
    [
        ({"expand_timesteps": False}, None),  # a 48-channel model without image-latent conditioning
        (None, {"in_channels": 16, "out_channels": 16}),  # expand_timesteps but channels that miss the VAE's
    ],
)
def test_wanpipeline_folders_that_are_not_ti2v_stay_refused(tiny_models_root, tmp_path, index_changes, transformer_changes):
    folder = _copy_configs(tiny_models_root / "tiny-wan22-ti2v-5b", tmp_path / "m", index_changes, transformer_changes)
    with pytest.raises(ModelFolderError, match="text-to-video"):
        detect_family(folder)


def test_ti2v_written_as_image_to_video_pipeline_is_still_recognised(tiny_models_root, tmp_path):
    """Folders re-saved through WanImageToVideoPipeline (as earlier versions of the tiny model) keep working."""
    folder = _copy_configs(tiny_models_root / "tiny-wan22-ti2v-5b", tmp_path / "m", {"_class_name": "WanImageToVideoPipeline"})
    assert detect_family(folder).id == "wan2.2-ti2v-5b"


def test_unknown_pipeline_lists_its_components_and_the_supported_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FancyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelFolderError) as err:
        detect_family(tmp_path)
    assert "FancyPipeline" in str(err.value) and "unet" in str(err.value) and "Wan2.1 I2V" in str(err.value)


def test_folder_without_model_index_says_what_a_diffusers_folder_is(tmp_path):
    with pytest.raises(ModelFolderError, match="model_index.json"):
        detect_family(tmp_path)


def test_corrupt_model_index_is_called_corrupt(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="corrupt"):
        detect_family(tmp_path)


def test_model_folders_are_found_in_subfolders_and_through_links(tmp_path, tiny_models_root):
    root = tmp_path / "diffusers"
    (root / "wan" / "nested").mkdir(parents=True)
    (root / "wan" / "nested" / "model_index.json").write_text("{}")
    (root / "linked").symlink_to(tiny_models_root / "tiny-wan21-i2v", target_is_directory=True)
    (root / "empty").mkdir()
    found = list_model_folders([root, tmp_path / "missing"])
    assert found == ["linked", "wan/nested"]
    assert resolve_model_folder("linked", [root]) == root / "linked"


@pytest.mark.parametrize("name", ["../outside", "/etc", "wan/../../x"])
def test_model_names_that_escape_the_models_folder_are_refused(tmp_path, name):
    with pytest.raises(ModelFolderError):
        resolve_model_folder(name, [tmp_path])


def test_a_symlink_loop_lists_each_model_folder_once(tmp_path):
    root = tmp_path / "diffusers"
    (root / "wan" / "a").mkdir(parents=True)
    (root / "wan" / "a" / "model_index.json").write_text("{}")
    (root / "b").mkdir()
    (root / "b" / "model_index.json").write_text("{}")
    (root / "loop").symlink_to(root, target_is_directory=True)  # models/diffusers/loop -> models/diffusers
    (root / "wan" / "back").symlink_to(root / "wan", target_is_directory=True)
    assert list_model_folders([root]) == ["b", "wan/a"]
    with pytest.raises(ModelFolderError, match="not found"):
        resolve_model_folder("loop/b", [root])


def test_a_folder_reachable_directly_and_through_a_link_is_listed_under_its_direct_name(tmp_path):
    root = tmp_path / "diffusers"
    (root / "wan" / "a").mkdir(parents=True)
    (root / "wan" / "a" / "model_index.json").write_text("{}")
    (root / "alias").symlink_to(root / "wan", target_is_directory=True)  # sorts before 'wan'
    assert list_model_folders([root]) == ["wan/a"]


def test_one_model_folder_linked_under_two_names_is_listed_under_both(tmp_path, tiny_models_root):
    root = tmp_path / "diffusers"
    root.mkdir()
    for name in ("Wan2.1-I2V-14B-480P-Diffusers", "tiny-wan21-i2v"):
        (root / name).symlink_to(tiny_models_root / "tiny-wan21-i2v", target_is_directory=True)
    assert list_model_folders([root]) == ["tiny-wan21-i2v", "Wan2.1-I2V-14B-480P-Diffusers"]
    assert resolve_model_folder("tiny-wan21-i2v", [root]) == root / "tiny-wan21-i2v"


def _copy_with_links(src, dst):
    """A model folder whose model_index.json is a real, editable copy and whose components link to ``src``."""
    dst.mkdir()
    for child in src.iterdir():
        if child.name == "model_index.json":
            (dst / child.name).write_text(child.read_text())
        else:
            (dst / child.name).symlink_to(child, target_is_directory=child.is_dir())
    return dst


def test_every_tiny_model_folder_is_complete(tiny_models_root):
    from vramwise.families import missing_component_reason

    for folder in sorted(p for p in tiny_models_root.iterdir() if (p / "model_index.json").is_file()):
        try:
            family = detect_family(folder)
        except ModelFolderError as e:
            assert "incomplete" not in str(e), e
            continue
        assert missing_component_reason(ModelIndex.read(folder), family) is None


def test_model_index_without_a_component_names_it(tmp_path, tiny_models_root):

    folder = _copy_with_links(tiny_models_root / "tiny-wan21-i2v", tmp_path / "wan")
    index = json.loads((folder / "model_index.json").read_text())
    del index["vae"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError) as err:
        detect_family(folder)
    assert "'vae'" in str(err.value) and "incomplete" in str(err.value) and "expected" not in str(err.value)


def test_a_listed_component_without_its_folder_names_it(tmp_path, tiny_models_root):
    folder = _copy_with_links(tiny_models_root / "tiny-wan21-i2v", tmp_path / "wan")
    (folder / "text_encoder").unlink()
    with pytest.raises(ModelFolderError, match="'text_encoder'.*no such sub-folder"):
        detect_family(folder)
