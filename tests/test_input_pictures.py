"""The templates' LoadImage pictures are shipped and installed into ComfyUI's input folder without touching a user's files."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from vramwise.input_pictures import PACK_PICTURES, install_input_pictures

REPO = Path(__file__).resolve().parent.parent


def _pictures_the_templates_load() -> set[str]:
    names = set()
    for path in (REPO / "workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                names.add(node["widgets_values"][0])
    return names


def test_every_picture_a_template_loads_is_shipped():
    needed = _pictures_the_templates_load()
    assert needed == {"vramwise_start.png", "vramwise_end.png"}
    for name in needed:
        with Image.open(PACK_PICTURES / name) as im:
            assert im.format == "PNG" and im.size == (832, 480)


def test_missing_pictures_are_copied(tmp_path):
    written, problem = install_input_pictures(tmp_path / "input")
    assert problem is None
    assert sorted(p.name for p in written) == ["vramwise_end.png", "vramwise_start.png"]
    for p in written:
        assert p.read_bytes() == (PACK_PICTURES / p.name).read_bytes()


def test_a_users_file_of_the_same_name_is_never_overwritten(tmp_path):
    (tmp_path / "vramwise_start.png").write_bytes(b"the user's own picture")
    written, problem = install_input_pictures(tmp_path)
    assert problem is None and [p.name for p in written] == ["vramwise_end.png"]
    assert (tmp_path / "vramwise_start.png").read_bytes() == b"the user's own picture"
    assert install_input_pictures(tmp_path) == ([], None)  # a second start changes nothing


def test_an_unwritable_input_folder_gives_a_note_instead_of_an_exception(tmp_path):
    blocked = tmp_path / "input"
    blocked.write_text("a file where the folder should be")
    written, problem = install_input_pictures(blocked)
    assert written == [] and "could not copy the template pictures" in problem and str(PACK_PICTURES) in problem
