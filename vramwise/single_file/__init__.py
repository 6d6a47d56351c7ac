"""Wan pipelines assembled from the ComfyUI-format single files users already have.

``detect`` reads safetensors headers only; ``assemble.SingleFileSpec`` is the loader's ``source`` hook.
"""

from .assemble import SingleFileSpec
from .detect import ArchInfo, detect_transformer

__all__ = ["ArchInfo", "SingleFileSpec", "detect_transformer"]
