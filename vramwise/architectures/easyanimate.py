"""EasyAnimate V5.1 transformer (diffusers ``EasyAnimateTransformer3DModel``): joint text + video attention."""

from __future__ import annotations

from . import DenoiserArchitecture, register_architecture

EASYANIMATE = register_architecture(DenoiserArchitecture(
    name="easyanimate",
    model_classes=("EasyAnimateTransformer3DModel",),
    block_class="EasyAnimateTransformerBlock",
    blocks="transformer_blocks",
    self_attention="attn1",
    cross_attention=None,  # text tokens join the video tokens in attn1
    ffn="ff",
    norms=("norm1", "norm2", "norm3"),
    self_attention_processor="EasyAnimateAttnProcessor2_0",
    patch_axes="hw",
    default_latent=(21, 60, 104),  # the planner's Wan-sized default, kept so plans under auto do not change
))
