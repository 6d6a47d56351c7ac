"""VRAMWise I2V: large image-to-video models on small GPUs, as ComfyUI nodes."""

try:
    import comfy_api  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    # Imported outside ComfyUI (pytest collects the repo root as a package): the engine in vramwise/ is
    # usable on its own, the nodes are not.
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
