"""Socket types shared by the pack's nodes."""

from __future__ import annotations

from .comfy_bridge import io

VramwiseModelType = io.Custom("VRAMWISE_MODEL")
VramwiseLatentType = io.Custom("VRAMWISE_LATENT")

CATEGORY = "VRAMWise I2V"
