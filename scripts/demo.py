"""The demo behind scripts/demo.sh: tiny model -> real ComfyUI -> shipped demo workflow -> a video file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402
from comfy_harness import CACHE, REPO, ComfyServer, execution_error  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402

DEMO_WORKFLOW = REPO / "workflows" / "vramwise_tiny_demo.json"
DEMO_BASE = CACHE / "demo"


def write_start_image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1)
    img[(x - 40) ** 2 + (y - 48) ** 2 < 18**2] = [1.0, 0.9, 0.1]
    Image.fromarray((img * 255).astype("uint8")).save(path)


def main() -> int:
    t0 = time.time()
    models = tiny_models.build_all(CACHE / "tiny-models", only=["tiny-wan21-i2v"])
    server = ComfyServer(DEMO_BASE)
    server.prepare()
    link = server.models_dir / "diffusers" / "tiny-wan21-i2v"
    if not link.exists():
        link.symlink_to(models["tiny-wan21-i2v"], target_is_directory=True)
    write_start_image(server.input_dir / "vramwise_start.png")
    workflow = json.loads(DEMO_WORKFLOW.read_text())
    with server:
        print(f"ComfyUI with the pack at {server.url} (base folder {server.base})", flush=True)
        prompt = ui_to_api(workflow, server.object_info())
        entry = server.run(prompt, timeout=600, extra_data={"extra_pnginfo": {"workflow": workflow}})
        if entry["status"]["status_str"] != "success":
            error = execution_error(entry) or entry["status"]
            print(f"demo failed: {error.get('exception_message', error) if isinstance(error, dict) else error}")
            print(f"server log: {server.log_path}")
            return 1
    written = []
    for node_output in entry["outputs"].values():
        for item in node_output.get("images", []) + node_output.get("videos", []) + node_output.get("gifs", []):
            if isinstance(item, dict) and "filename" in item:
                written.append(server.output_dir / item.get("subfolder", "") / item["filename"])
    if not written:
        print("demo ran but wrote no file")
        return 1
    print(f"demo finished in {time.time() - t0:.1f}s")
    for path in written:
        print(f"video written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
