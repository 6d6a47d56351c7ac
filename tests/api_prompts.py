"""API-format prompts for the tiny models, built the way the frontend would queue them.

Node ids are fixed so tests can splice extra nodes in: "1" LoadImage, "2" loader, "3" sampler, "4" decode,
"5" the saver, "6" the end-image LoadImage.
"""

from __future__ import annotations

import itertools
from typing import Any

from PIL import Image, ImageSequence

from comfy_harness import execution_error
from conftest import END_IMAGE, START_IMAGE

_counter = itertools.count()


def i2v_prompt(
    model: str = "tiny-wan21-i2v",
    *,
    offload: str = "none",
    dtype: str = "bf16",
    text_encoder_on_cpu: bool = False,
    width: int = 64,
    height: int = 64,
    frames: int = 5,
    steps: int = 2,
    cfg: float = 5.0,
    seed: int = 1,
    shift: float = 3.0,
    resize_mode: str = "crop",
    prompt: str = "a yellow ball rolls to the right",
    negative_prompt: str = "blurry",
    end_image: bool = False,
    tiling: str = "auto",
    tile_size: int = 256,
    tile_overlap: int = 64,
    save: str = "webp",
    prefix: str | None = None,
) -> dict[str, Any]:
    """Image -> loader -> sampler -> decode -> saver: "webp" (core SaveAnimatedWEBP), "mp4" (our writer), "preview", "none"."""
    prefix = prefix or f"vramwise_test_{next(_counter)}"
    prompt_graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": START_IMAGE}},
        "2": {
            "class_type": "VRAMWiseModelLoader",
            "inputs": {"model": model, "offload_mode": offload, "weight_dtype": dtype, "text_encoder_on_cpu": text_encoder_on_cpu},
        },
        "3": {
            "class_type": "VRAMWiseSampler",
            "inputs": {
                "model": ["2", 0], "image": ["1", 0], "prompt": prompt, "negative_prompt": negative_prompt,
                "width": width, "height": height, "num_frames": frames, "steps": steps, "cfg": cfg, "seed": seed,
                "shift": shift, "resize_mode": resize_mode,
            },
        },
        "4": {
            "class_type": "VRAMWiseVAEDecode",
            "inputs": {"model": ["2", 0], "latent": ["3", 0], "tiling": tiling, "tile_size": tile_size, "tile_overlap": tile_overlap},
        },
    }
    if end_image:
        prompt_graph["6"] = {"class_type": "LoadImage", "inputs": {"image": END_IMAGE}}
        prompt_graph["3"]["inputs"]["end_image"] = ["6", 0]
    if save == "webp":
        prompt_graph["5"] = {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {"images": ["4", 0], "filename_prefix": prefix, "fps": 16.0, "lossless": True, "quality": 100, "method": "default"},
        }
    elif save in ("mp4", "writer"):
        prompt_graph["5"] = {"class_type": "VRAMWiseVideoWriter", "inputs": writer_inputs(["4", 0], prefix)}
    elif save == "preview":
        prompt_graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    return prompt_graph


def saved_files(entry: dict[str, Any], node_id: str = "5") -> list[dict[str, Any]]:
    """The files an output node reported in its history ``ui`` output."""
    outputs = entry.get("outputs", {}).get(node_id, {})
    return list(outputs.get("images", []) or outputs.get("videos", []) or outputs.get("gifs", []))


def assert_success(entry: dict[str, Any]) -> None:
    """The prompt finished without an error (the assertion message is the server's error)."""
    status = entry.get("status", {})
    assert status.get("status_str") == "success", execution_error(entry) or status


def saved_frames(server: Any, entry: dict[str, Any], node_id: str = "5") -> list[Image.Image]:
    """The RGB frames of the one file an output node saved."""
    files = saved_files(entry, node_id)
    assert len(files) == 1, entry.get("outputs")
    f = files[0]
    with Image.open(server.output_dir / f["subfolder"] / f["filename"]) as im:
        return [frame.convert("RGB").copy() for frame in ImageSequence.Iterator(im)]


def successful_frame_bytes(server: Any, entry: dict[str, Any]) -> list[bytes]:
    """The RGB bytes of each frame a successful prompt saved (fails with the execution error otherwise), for
    comparing runs exactly."""
    status = entry.get("status", {})
    assert status.get("status_str") == "success", execution_error(entry) or status
    return [frame.tobytes() for frame in saved_frames(server, entry)]


def writer_inputs(images: list, prefix: str, **overrides: Any) -> dict[str, Any]:
    inputs = {
        "images": images, "fps": 16.0, "format": "video/h264-mp4", "filename_prefix": prefix, "save_output": True,
        "crf": -1, "quality": 90, "lossless": False, "pix_fmt": "yuv420p", "loop_count": 0, "pingpong": False,
        "dither": "sierra2_4a",
    }
    inputs.update(overrides)
    return inputs
