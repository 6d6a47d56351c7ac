"""Write the shipped UI-format workflows in workflows/ from short graph descriptions.

Widget values are written in the order the live schemas give (a server with the pack is started to read
/object_info), so the files match what the frontend itself would save. Run after changing a node's inputs,
then review the diff: a saved workflow is a contract with users.

    .cache/venv/bin/python scripts/make_workflows.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_api import _has_control_widget, _input_specs, _is_widget  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
START_IMAGE = "vramwise_start.png"
END_IMAGE = "vramwise_end.png"
# The distill LoRA under the name users download it as (the tests' server has a tiny LoRA under this name).
LIGHTX2V_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source node id, output slot)
    pos: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (320, 200)
    title: str | None = None


def build(nodes: list[Node], object_info: dict[str, Any], note: str = "") -> dict[str, Any]:
    links: list[list[Any]] = []
    outputs: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, node in enumerate(nodes):
        info = object_info[node.type]
        specs = _input_specs(info)
        inputs = []
        # The frontend (1.32) numbers a node's input slots sockets first, then one slot per widget, each group in
        # schema order; a linked widget's link must name that slot, or the frontend renumbers it on load.
        frontend_slots = [n for n, k, o in specs if not _is_widget(k, o)] + [n for n, k, o in specs if _is_widget(k, o)]
        for name, kind, opts in sorted(specs, key=lambda spec: frontend_slots.index(spec[0])):
            if name in node.links:
                src, slot = node.links[name]
                link_id = len(links) + 1
                src_type = object_info[next(n.type for n in nodes if n.id == src)]["output"][slot]
                links.append([link_id, src, slot, node.id, frontend_slots.index(name), src_type])
                outputs.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": src_type, "link": link_id}
                if _is_widget(kind, opts):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(kind, opts):
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": None})
        values = []
        for name, kind, opts in specs:
            if not _is_widget(kind, opts):
                continue
            if name in node.widgets:
                value = node.widgets[name]
            elif "default" in opts:
                value = opts["default"]
            else:
                options = kind if isinstance(kind, list) else opts.get("options", [])
                value = options[0] if options else None
            values.append(value)
            if _has_control_widget(kind, opts):
                values.append("fixed" if kind in ("INT", "FLOAT") else "image")
        ui_node = {
            "id": node.id,
            "type": node.type,
            "pos": list(node.pos),
            "size": list(node.size),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "properties": {"Node name for S&R": node.type},
            "widgets_values": values,
        }
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append((node, ui_node, info))
    for node, ui_node, info in ui_nodes:
        for slot, (otype, oname) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            ui_node["outputs"].append({"name": oname, "type": otype, "links": outputs.get((node.id, slot), []), "slot_index": slot})
    workflow = {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": [u for _, u, _ in ui_nodes],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "vramwise_note": note} if note else {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }
    return workflow


def writer_node(node_id: int, images_from: int, prefix: str, pos: tuple[int, int], fps: float = 16.0,
                fps_from: int | None = 4) -> Node:
    """The pack's video writer, H.264 MP4 (the format that plays everywhere), its fps linked from the decoder
    (the model's own rate: 24 for TI2V-5B, 8 for EasyAnimate); the widget value stays as the unlinked fallback."""
    links = {"images": (images_from, 0)} | ({"fps": (fps_from, 1)} if fps_from is not None else {})
    return Node(node_id, "VRAMWiseVideoWriter", {"filename_prefix": prefix, "fps": fps, "format": "video/h264-mp4"},
                links, pos=pos, size=(360, 520))


def i2v_graph(object_info: dict[str, Any], *, model: str, sampler: dict[str, Any], prefix: str,
              loader: dict[str, Any] | None = None, end_image: bool = False, extra: list[Node] | None = None,
              model_from: int = 2, fps: float = 16.0) -> list[Node]:
    nodes = [
        Node(1, "LoadImage", {"image": START_IMAGE}, pos=(0, 260), size=(300, 340), title="Start frame"),
        Node(2, "VRAMWiseModelLoader", {"model": model, **(loader or {})}, pos=(0, 0), size=(380, 180)),
        Node(3, "VRAMWiseSampler", sampler, {"model": (model_from, 0), "image": (1, 0)} | ({"end_image": (6, 0)} if end_image else {}),
             pos=(420, 0), size=(400, 560)),
        Node(4, "VRAMWiseVAEDecode", {}, {"model": (model_from, 0), "latent": (3, 0)}, pos=(860, 0), size=(320, 200)),
    ]
    if end_image:
        nodes.append(Node(6, "LoadImage", {"image": END_IMAGE}, pos=(0, 640), size=(300, 340), title="End frame"))
    nodes += extra or []
    nodes.append(writer_node(5, 4, prefix, pos=(1220, 0), fps=fps))
    return nodes


def extend_graph(object_info: dict[str, Any], *, model: str, sampler: dict[str, Any], prefix: str,
                 prompt_2: str) -> list[Node]:
    """Two segments: the second starts from the first's last decoded frame; core nodes pick that frame, drop the
    second segment's repeat of it and join the two, so the clip doubles in length with one continuous motion."""
    frames = int(sampler["num_frames"])
    nodes = i2v_graph(object_info, model=model, sampler=sampler, prefix=prefix)
    writer = nodes.pop()  # re-linked to the joined frames below
    nodes += [
        Node(10, "ImageFromBatch", {"batch_index": frames - 1, "length": 1}, {"image": (4, 0)},
             pos=(860, 260), size=(320, 130), title="Last frame of segment 1"),
        Node(11, "VRAMWiseSampler", {**sampler, "prompt": prompt_2, "seed": int(sampler["seed"]) + 1},
             {"model": (2, 0), "image": (10, 0)}, pos=(420, 620), size=(400, 560), title="Segment 2"),
        Node(12, "VRAMWiseVAEDecode", {}, {"model": (2, 0), "latent": (11, 0)}, pos=(860, 620), size=(320, 200)),
        # Segment 2 opens on (a re-encoding of) segment 1's last frame: skip it so no frame shows twice.
        Node(13, "ImageFromBatch", {"batch_index": 1, "length": 4096}, {"image": (12, 0)},
             pos=(860, 860), size=(320, 130), title="Segment 2 without its first frame"),
        Node(14, "ImageBatch", {}, {"image1": (4, 0), "image2": (13, 0)}, pos=(1220, 620), size=(260, 100),
             title="Join segments"),
    ]
    nodes.append(writer_node(5, 14, writer.widgets["filename_prefix"], pos=(1520, 0)))
    return nodes


def definitions(object_info: dict[str, Any]) -> dict[str, tuple[list[Node], str]]:
    """Every shipped workflow: file name -> (graph, note)."""
    wan_prompt = "A yellow ball rolls slowly to the right across a colourful striped floor, smooth camera."
    negative = "blurry, low quality, static, distorted"
    return {
        "vramwise_tiny_demo": (
            i2v_graph(object_info, model="tiny-wan21-i2v", prefix="vramwise/demo",
                      loader={"offload_mode": "model"},
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 128, "height": 96,
                               "num_frames": 17, "steps": 4, "cfg": 5.0, "seed": 42, "shift": 3.0}),
            "Runs in seconds on a CPU with the tiny random Wan2.1 model that scripts/demo.sh builds. Output is noise-like: the weights are random.",
        ),
        "wan21_i2v_tome": (
            i2v_graph(object_info, model="Wan2.1-I2V-14B-480P-Diffusers", prefix="vramwise/wan21_i2v_tome",
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                               "num_frames": 81, "steps": 40, "cfg": 5.0, "seed": 42, "shift": 3.0},
                      extra=[Node(7, "VRAMWiseTokenMerge", {"ratio": 0.5}, {"model": (2, 0)},
                                  pos=(0, 640), size=(380, 260))],
                      model_from=7),
            "Wan2.1 I2V 14B 480P with token merging. Bypass the Token Merge node (Ctrl+B) to compare with the unmerged video.",
        ),
        "wan21_i2v_480p_lightx2v_lora": (
            i2v_graph(object_info, model="Wan2.1-I2V-14B-480P-Diffusers", prefix="vramwise/wan21_i2v_lightx2v",
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                               "num_frames": 81, "steps": 4, "cfg": 1.0, "seed": 42, "shift": 5.0,
                               "scheduler": "lcm"},
                      extra=[Node(7, "VRAMWiseLoraLoader", {
                          "lora_name": LIGHTX2V_LORA, "strength": 1.0, "strength_low_noise": 1.0},
                          {"model": (2, 0)}, pos=(0, 640), size=(380, 160))],
                      model_from=7),
            "Wan2.1 I2V 14B 480P with the lightx2v step/CFG distill LoRA (Kijai's repackaged rank-64 file, in "
            "models/loras): 4 steps at cfg 1 (the negative prompt is not used): 4 denoiser passes instead of the 80 of 40 steps at cfg 5.",
        ),
        "wan21_i2v_step_cache": (
            i2v_graph(object_info, model="Wan2.1-I2V-14B-480P-Diffusers", prefix="vramwise/wan21_i2v_step_cache",
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                               "num_frames": 81, "steps": 40, "cfg": 5.0, "seed": 42, "shift": 3.0},
                      extra=[Node(7, "VRAMWiseStepCache", {"method": "easycache"}, {"model": (2, 0)},
                                  pos=(0, 640), size=(380, 240))],
                      model_from=7),
            "Wan2.1 I2V 14B 480P with the step cache (EasyCache rule, ComfyUI's defaults). The sampler's info says how "
            "many steps were computed and skipped. Try method teacache or magcache (published Wan2.1 calibrations); "
            "bypass the Step Cache node (Ctrl+B) to compare with the uncached video.",
        ),
        "wan21_i2v_480p": (
            i2v_graph(object_info, model="Wan2.1-I2V-14B-480P-Diffusers", prefix="vramwise/wan21_i2v",
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                               "num_frames": 81, "steps": 40, "cfg": 5.0, "seed": 42, "shift": 3.0}),
            "Wan2.1 I2V 14B 480P. Put the diffusers folder under models/diffusers (the name is a placeholder).",
        ),
        "wan22_i2v_a14b": (
            i2v_graph(object_info, model="Wan2.2-I2V-A14B-Diffusers", prefix="vramwise/wan22_i2v_a14b",
                      loader={"weight_dtype": "fp8_e4m3fn"},
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                               "num_frames": 81, "steps": 40, "cfg": 3.5, "seed": 42, "shift": 5.0}),
            "Wan2.2 I2V A14B (two 14B experts). fp8 storage keeps both experts within host RAM on 64 GB machines.",
        ),
        "wan22_ti2v_5b": (
            i2v_graph(object_info, model="Wan2.2-TI2V-5B-Diffusers", prefix="vramwise/wan22_ti2v_5b", fps=24.0,
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 1280, "height": 704,
                               "num_frames": 121, "steps": 50, "cfg": 5.0, "seed": 42, "shift": 5.0}),
            "Wan2.2 TI2V 5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers): 1280x704, 121 frames at 24 fps (the decoder's fps is "
            "linked to the writer). Sizes are multiples of 32.",
        ),
        "wan21_i2v_extend": (
            extend_graph(object_info, model="Wan2.1-I2V-14B-480P-Diffusers", prefix="vramwise/wan21_i2v_extend",
                         sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                                  "num_frames": 81, "steps": 40, "cfg": 5.0, "seed": 42, "shift": 3.0},
                         prompt_2="The yellow ball keeps rolling to the right and slows down, smooth camera."),
            "A longer video by chaining: segment 2 starts from the last frame of segment 1 (core Image From Batch, "
            "batch_index = num_frames - 1), its first frame is dropped and the two are joined (core Image Batch): "
            "81 + 80 = 161 frames. Set both samplers' num_frames alike and batch_index to num_frames - 1; add more "
            "segments the same way.",
        ),
        "wan21_i2v_comfy_files": (
            [Node(2, "VRAMWiseCheckpointLoader", {
                "diffusion_model": "wan2.1_i2v_480p_14B_bf16.safetensors", "diffusion_model_2": "none",
                "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "clip_vision": "clip_vision_h.safetensors",
                "vae": "wan_2.1_vae.safetensors"}, pos=(0, 0), size=(420, 300)) if n.id == 2 else n
             for n in i2v_graph(object_info, model="", prefix="vramwise/wan21_i2v_comfy_files",
                                sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 832, "height": 480,
                                         "num_frames": 81, "steps": 40, "cfg": 5.0, "seed": 42, "shift": 3.0})],
            "Wan2.1 I2V 14B 480P from ComfyUI's single files (models/diffusion_models, text_encoders, clip_vision, vae).",
        ),
        "easyanimate_v51_i2v": (
            i2v_graph(object_info, model="EasyAnimateV5.1-7b-zh-InP-diffusers", prefix="vramwise/easyanimate_v51_i2v",
                      loader={"offload_mode": "model"}, end_image=True, fps=8.0,
                      sampler={"prompt": wan_prompt, "negative_prompt": "blurry, distorted, deformed, text, subtitles, static, ugly",
                               "width": 672, "height": 384, "num_frames": 49, "steps": 50, "cfg": 6.0, "seed": 42,
                               "shift": 1.0}),
            "EasyAnimate V5.1 7B InP (alibaba-pai/EasyAnimateV5.1-7b-zh-InP-diffusers): start and end frame, 49 frames at 8 fps. "
            "Disconnect the end frame for plain image-to-video. The older V5 (Bert + T5) folders are not supported.",
        ),
        "i2vgenxl_i2v": (
            i2v_graph(object_info, model="i2vgen-xl", prefix="vramwise/i2vgenxl_i2v", loader={"offload_mode": "model"},
                      fps=16.0,
                      sampler={"prompt": wan_prompt, "negative_prompt": negative, "width": 1280, "height": 704,
                               "num_frames": 16, "steps": 50, "cfg": 9.0, "seed": 42, "shift": 1.0}),
            "I2VGen-XL (ali-vilab/i2vgen-xl, diffusers folder): 16 frames at 16 fps; any frame count works, sizes are multiples of 8. shift is not used.",
        ),
    }


PICTURES = REPO / "assets" / "input"


def write_template_pictures(folder: Path = PICTURES) -> list[Path]:
    """The start and end pictures the templates load (shipped in assets/input/, copied into ComfyUI's input
    folder at pack start): 832x480 like Wan's default size, a striped floor and a yellow ball that moves from
    the left (start) to the right (end), so the prompts in the templates describe them."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w = 480, 832
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    written = []
    for name, cx in ((START_IMAGE, 260), (END_IMAGE, 572)):
        img = np.stack([0.25 + 0.5 * x / w, 0.3 + 0.4 * y / h, 0.55 + 0.35 * np.sin(x / 26.0)], axis=-1)
        img[: h // 2] = [0.55, 0.75, 0.95]  # sky above the floor
        ball = (x - cx) ** 2 + (y - 300) ** 2 < 70**2
        img[ball] = [1.0, 0.85, 0.1]
        path = folder / name
        Image.fromarray((img.clip(0, 1) * 255).astype("uint8")).save(path, optimize=True)
        written.append(path)
    return written


def write_icon(path: Path = REPO / "assets" / "icon.png") -> Path:
    """The registry icon (pyproject [tool.comfy] Icon): the templates' ball on its striped floor, 256x256."""
    import numpy as np
    from PIL import Image

    n = 256
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    img = np.stack([0.25 + 0.5 * x / n, 0.3 + 0.4 * y / n, 0.55 + 0.35 * np.sin(x / 12.0)], axis=-1)
    img[: n // 2] = [0.55, 0.75, 0.95]
    img[(x - 128) ** 2 + (y - 150) ** 2 < 64**2] = [1.0, 0.85, 0.1]
    Image.fromarray((img.clip(0, 1) * 255).astype("uint8")).save(path, optimize=True)
    return path


def main() -> int:
    from comfy_harness import ComfyServer

    for path in [*write_template_pictures(), write_icon()]:
        print(path)

    with ComfyServer() as server:
        object_info = server.object_info()
    WORKFLOWS.mkdir(exist_ok=True)
    for name, (nodes, note) in definitions(object_info).items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(build(nodes, object_info, note), indent=2) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
