"""VRAMWise I2V engine: model families, offloading, memory planning, token merging and video encoding.

Nothing in this package imports ComfyUI; the adapters in ``nodes/`` are the only bridge to it.
"""

__version__ = "0.1.0"

from .compat import check_diffusers

# Refuse at import, with the versions and the fix, rather than with an AttributeError deep in a run.
check_diffusers()
