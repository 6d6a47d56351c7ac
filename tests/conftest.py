"""Shared fixtures: tiny random models of the real architectures, and a real ComfyUI server with the pack.

The server gets the tiny models under the folder names real users have, so the shipped workflows run
unchanged against it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import comfy_harness  # noqa: E402
import tiny_models  # noqa: E402

TINY_ROOT = Path(os.environ.get("VRAMWISE_TINY_MODELS", REPO / ".cache" / "tiny-models"))

# Real model folder names (as published) mapped to the tiny model standing in for them on the test server.
REAL_NAME_ALIASES = {
    "Wan2.1-I2V-14B-480P-Diffusers": "tiny-wan21-i2v",
    "Wan2.1-FLF2V-14B-720P-diffusers": "tiny-wan21-flf2v",
    "Wan2.2-I2V-A14B-Diffusers": "tiny-wan22-i2v-a14b",
    "Wan2.2-TI2V-5B-Diffusers": "tiny-wan22-ti2v-5b",
    "EasyAnimateV5.1-7b-zh-InP-diffusers": "tiny-easyanimate-v51-inp",
    "i2vgen-xl": "tiny-i2vgenxl",
}

START_IMAGE = "vramwise_start.png"
END_IMAGE = "vramwise_end.png"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server: needs the real ComfyUI server (slower)")


@pytest.fixture(scope="session")
def tiny_models_root() -> Path:
    tiny_models.build_all(TINY_ROOT)
    return TINY_ROOT


def write_test_images(folder: Path) -> None:
    """A start and an end picture with structure (gradients and a disc) so resizing and motion are visible."""
    import numpy as np
    from PIL import Image

    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    for name, cx in ((START_IMAGE, 40), (END_IMAGE, 88)):
        img = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1)
        disc = (x - cx) ** 2 + (y - 48) ** 2 < 18**2
        img[disc] = [1.0, 0.9, 0.1]
        Image.fromarray((img * 255).astype("uint8")).save(folder / name)


LIGHTX2V_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
WRONG_LORA = "wan_other_width_lora.safetensors"
PARTIAL_LORA = "wan_partial_lora.safetensors"


def write_test_loras(model_folder: Path, loras: Path) -> None:
    from diffusers import WanTransformer3DModel

    import tiny_loras

    transformer = WanTransformer3DModel.from_pretrained(model_folder / "transformer")
    tiny_loras.write_lora(transformer, loras / LIGHTX2V_LORA, "lightx2v")
    tiny_loras.write_wrong_lora(loras / WRONG_LORA)
    tiny_loras.write_lora(transformer, loras / "sub" / PARTIAL_LORA, "comfy", blocks=[0], extra_blocks=[5])


@pytest.fixture(scope="session")
def comfy_server(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfy-base")
    server = comfy_harness.ComfyServer(base, extra_args=["--cache-none"])
    server.prepare()
    diffusers = server.models_dir / "diffusers"
    for folder in sorted(tiny_models_root.iterdir()):
        if folder.is_dir():
            (diffusers / folder.name).symlink_to(folder, target_is_directory=True)
    for real, tiny in REAL_NAME_ALIASES.items():
        if (tiny_models_root / tiny).is_dir():
            (diffusers / real).symlink_to(tiny_models_root / tiny, target_is_directory=True)
    write_test_images(server.input_dir)
    # --- VRAMWiseCheckpointLoader: tiny Wan2.1 I2V single files under the usual Comfy names (models/
    # diffusion_models, text_encoders, clip_vision, vae), so workflows/wan21_i2v_comfy_files.json runs. ---
    if (tiny_models_root / "tiny-wan21-i2v").is_dir():
        import single_file_helpers

        single_file_helpers.write_comfy_models(tiny_models_root / "tiny-wan21-i2v", server.models_dir)
    # --- end VRAMWiseCheckpointLoader block ---
    # --- VRAMWiseLoraLoader: tiny LoRAs in models/loras, the distill one under the name users have (so
    # workflows/wan21_i2v_480p_lightx2v_lora.json runs), one for another model and one that fits in part. ---
    if (tiny_models_root / "tiny-wan21-i2v").is_dir():
        write_test_loras(tiny_models_root / "tiny-wan21-i2v", server.models_dir / "loras")
    # --- end VRAMWiseLoraLoader block ---
    server.start()
    yield server
    server.stop()
