"""ComfyUI adapters: schemas, validation glue, progress and cancel. The engine lives in ``vramwise/``."""

from __future__ import annotations

import logging

from ..vramwise.input_pictures import install_input_pictures
from . import comfy_bridge as comfy
from .checkpoint_loader import VRAMWiseCheckpointLoader
from .comfy_bridge import ComfyExtension, io
from .lora import VRAMWiseLoraLoader
from .model_loader import VRAMWiseModelLoader
from .sampler import VRAMWiseSampler
from .step_cache import VRAMWiseStepCache
from .token_merge import VRAMWiseTokenMerge
from .unload import VRAMWiseUnloadModels
from .vae_decode import VRAMWiseVAEDecode
from .video_writer import VRAMWiseVideoWriter

NODES: list[type[io.ComfyNode]] = [
    VRAMWiseModelLoader,
    VRAMWiseSampler,
    VRAMWiseVAEDecode,
    VRAMWiseTokenMerge,
    VRAMWiseVideoWriter,
    VRAMWiseUnloadModels,
    VRAMWiseCheckpointLoader,
    VRAMWiseLoraLoader,
    VRAMWiseStepCache,
]


class VramwiseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> VramwiseExtension:
    # The templates' LoadImage pictures, so a template runs as shipped (missing files only; never overwrites).
    _written, problem = install_input_pictures(comfy.input_directory())
    if problem:
        logging.warning(problem)
    return VramwiseExtension()
