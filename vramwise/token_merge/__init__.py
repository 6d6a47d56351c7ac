"""Token merging for image-to-video denoisers (no ComfyUI imports).

* Video DiTs (Wan, EasyAnimate): keys/values of self-attention merged in pairs on the frames x H x W grid
  (``pairing``) with exact proportional attention (``attention``), by swapping attention processors (``dit``).
* I2VGen-XL's UNet: tomesd on the spatial transformer blocks only (``unet``).
* ``TokenMergePatch`` applies either during one sampling run (``patch``).
"""

from .dit import DitMergeSettings, patch_dit
from .attention import size_grouped_attention
from .pairing import WINDOWS, plan_pairs
from .patch import MAX_RATIO, TokenMergePatch, merge_method, step_active
from .unet import UnetMergeSettings, patch_unet

__all__ = [
    "DitMergeSettings",
    "MAX_RATIO",
    "TokenMergePatch",
    "UnetMergeSettings",
    "WINDOWS",
    "merge_method",
    "patch_dit",
    "patch_unet",
    "plan_pairs",
    "size_grouped_attention",
    "step_active",
]
