"""VRAMWiseUnloadModels: give back the GPU memory held by our cached pipelines and by ComfyUI's own models."""

from __future__ import annotations

from ..vramwise.device import allocated_bytes, release_memory
from ..vramwise.loader import CACHE
from . import comfy_bridge as comfy
from .comfy_bridge import io
from .types import CATEGORY


class VRAMWiseUnloadModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VRAMWiseUnloadModels",
            display_name="VRAMWise Unload Models",
            category=CATEGORY,
            description=(
                "Releases every model the VRAMWise loaders keep between runs and asks ComfyUI to unload its own "
                "models, then reports how much GPU memory that freed. Connect anything to 'passthrough' to run it "
                "after that node; the value comes out unchanged."
            ),
            inputs=[
                io.AnyType.Input("passthrough", optional=True,
                                 tooltip="Optional: any value (e.g. the decoded IMAGE); passed through unchanged."),
            ],
            outputs=[io.AnyType.Output(display_name="passthrough")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # always run: memory state is not an input

    @classmethod
    def execute(cls, passthrough=None) -> io.NodeOutput:
        device = comfy.torch_device()
        before = allocated_bytes(device)
        ours = CACHE.release_all()
        comfy.free_comfyui_models()
        release_memory(device)
        after = allocated_bytes(device)
        total = max(0, before - after)
        text = (f"freed {total / 2**30:.2f} GiB of GPU memory ({ours / 2**30:.2f} GiB from VRAMWise models); "
                f"{after / 2**30:.2f} GiB still allocated by this process")
        if device.type != "cuda":
            text = "no CUDA device: released the cached VRAMWise models and ComfyUI's models (host memory)"
        return io.NodeOutput(passthrough, ui=comfy.ui.PreviewText(text))
