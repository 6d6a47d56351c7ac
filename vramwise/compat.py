"""The diffusers versions the engine works with, checked when the engine is imported.

A ComfyUI environment is shared by many packs, so requirements.txt gives a range instead of a pin. The floor is the
first release with every API the engine calls: Wan2.2 in WanImageToVideoPipeline (transformer_2, boundary_ratio,
expand_timesteps), the Wan2.2 VAE (is_residual), and WanAttention / WanAttnProcessor, whose forward
memory/lean_wan.py and token_merge/dit.py follow (all arrived in 0.35.0; 0.34 has WanAttnProcessor2_0 only). The cap
is the next minor release: the lean forward mirrors diffusers internals, and only releases below it were run
(the tests run on 0.42.1).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

DIFFUSERS_RANGE = ">=0.35,<0.43"
TESTED_DIFFUSERS = "0.42.1"


class DependencyVersionError(ImportError):
    """diffusers is missing or outside the range the engine works with."""


def check_diffusers(installed: str | None = None) -> str:
    """The installed diffusers version, or a DependencyVersionError saying what is installed and what to run."""
    fix = (f"install a matching one into ComfyUI's Python: pip install \"diffusers{DIFFUSERS_RANGE}\" "
           "(or pip install -r custom_nodes/comfyui-vramwise/requirements.txt)")
    if installed is None:
        try:
            installed = version("diffusers")
        except PackageNotFoundError:
            raise DependencyVersionError(f"comfyui-vramwise needs diffusers {DIFFUSERS_RANGE}, which is not installed; {fix}.") from None
    try:
        ok = SpecifierSet(DIFFUSERS_RANGE).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise DependencyVersionError(
            f"comfyui-vramwise needs diffusers {DIFFUSERS_RANGE} (tested with {TESTED_DIFFUSERS}); this environment "
            f"has diffusers {installed}. The other packs in this ComfyUI may need their own version; {fix}."
        )
    return installed
