"""Wan2.1 / Wan2.2 transformer (diffusers ``WanTransformer3DModel``)."""

from __future__ import annotations

from . import DenoiserArchitecture, register_architecture

WAN = register_architecture(DenoiserArchitecture(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    block_class="WanTransformerBlock",
    blocks="blocks",
    self_attention="attn1",
    cross_attention="attn2",
    ffn="ffn",
    norms=("norm1", "norm2", "norm3"),
    self_attention_processor="WanAttnProcessor",
    patch_axes="thw",
    # The Wan attention processor hard-codes 512 text tokens when it splits image from text tokens.
    text_tokens=512,
    image_tokens=257,  # CLIP ViT-H/14 on a 224 px image: 16 x 16 patches + the class token
    # ~0.5 GiB at 14B, run once per forward before the blocks
    transient_modules=("condition_embedder",),
    lean_forward="wan",
    default_latent=(21, 60, 104),  # 480x832, 81 frames
))
