"""Token merging for image-to-video denoisers (no ComfyUI imports).

* Video DiTs (Wan, EasyAnimate): keys/values of self-attention merged on the frames x H x W grid with
  proportional attention, by swapping attention processors (``dit``, ``matching``).
* I2VGen-XL's UNet: tomesd on the spatial transformer blocks only (``unet``).
* ``TokenMergePatch`` applies either during one sampling run (``patch``).
"""

from .dit import DitMergeSettings, patch_dit
from .matching import WINDOWS, plan_merge, proportional_attention
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
    "plan_merge",
    "proportional_attention",
    "step_active",
]
