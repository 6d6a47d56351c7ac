"""What the registry and pip read: license, icon, dependency ranges, and the import-time diffusers check."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from vramwise.compat import DIFFUSERS_RANGE, DependencyVersionError, check_diffusers

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(lines: list[str], name: str) -> str | None:
    for line in lines:
        m = re.match(rf"^\s*{name}\s*([<>=!~].*?)?\s*(#.*)?$", line)
        if m:
            return (m.group(1) or "").replace(" ", "")
    return None


def test_license_file_is_the_license_pyproject_declares():
    declared = PYPROJECT["project"]["license"]["text"]
    text = (REPO / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert text.startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_registry_icon_is_a_picture_in_this_repository():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    with Image.open(REPO / icon.removeprefix(prefix)) as im:
        assert im.format == "PNG" and im.width == im.height >= 128


def test_diffusers_is_a_range_in_both_dependency_lists_and_matches_the_import_check():
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert _requirement(requirements, "diffusers") == DIFFUSERS_RANGE
    assert f"diffusers{DIFFUSERS_RANGE}" in PYPROJECT["project"]["dependencies"]


def test_gguf_is_a_runtime_requirement():
    """The checkpoint loader lists .gguf files, so reading them cannot depend on a test-only package."""
    assert _requirement((REPO / "requirements.txt").read_text().splitlines(), "gguf") is not None
    assert any(d.startswith("gguf") for d in PYPROJECT["project"]["dependencies"])


@pytest.mark.parametrize("installed", ["0.35.0", "0.36.0", "0.42.1"])
def test_diffusers_inside_the_range_is_accepted(installed):
    assert check_diffusers(installed) == installed


@pytest.mark.parametrize("installed", ["0.34.0", "0.33.1", "0.43.0", "0.43.0.dev0", "1.0.0", "not-a-version"])
def test_diffusers_outside_the_range_is_refused_naming_both_versions_and_the_fix(installed):
    with pytest.raises(DependencyVersionError) as err:
        check_diffusers(installed)
    message = str(err.value)
    assert f"diffusers {installed}" in message and DIFFUSERS_RANGE in message
    assert f'pip install "diffusers{DIFFUSERS_RANGE}"' in message


def test_the_installed_diffusers_passes_the_check():
    import diffusers

    assert check_diffusers() == diffusers.__version__


def test_importing_the_engine_with_diffusers_outside_the_range_fails_with_the_message(tmp_path):
    """The check runs at import: a fake diffusers 0.30.0 distribution first on the path makes `import vramwise` fail."""
    import subprocess
    import sys

    dist = tmp_path / "diffusers-0.30.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffusers\nVersion: 0.30.0\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); sys.path.insert(1, {str(REPO)!r}); import vramwise"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs diffusers >=0.35,<0.43" in done.stderr and "diffusers 0.30.0" in done.stderr
