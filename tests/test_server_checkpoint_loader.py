"""VRAMWiseCheckpointLoader inside a real ComfyUI server: listing, a run from single files, a clear error."""

from __future__ import annotations

import pytest

from api_prompts import i2v_prompt, saved_files
from comfy_harness import execution_error
from single_file_helpers import COMFY_WAN21_GGUF

pytestmark = pytest.mark.server

FILES = {
    "diffusion_model": "wan2.1_i2v_480p_14B_bf16.safetensors",
    "diffusion_model_2": "none",
    "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip_vision": "clip_vision_h.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


def _prompt(**files) -> dict:
    graph = i2v_prompt(frames=5)
    graph["2"] = {
        "class_type": "VRAMWiseCheckpointLoader",
        "inputs": {**FILES, **files, "offload_mode": "none", "weight_dtype": "bf16", "text_encoder_on_cpu": False},
    }
    return graph


def test_lists_comfy_folders_and_shares_the_model_loader_options(comfy_server):
    info = comfy_server.object_info()
    node = info["VRAMWiseCheckpointLoader"]["input"]
    required = {**node["required"], **node.get("optional", {})}
    assert FILES["diffusion_model"] in required["diffusion_model"][1]["options"]
    # .gguf files are listed too, from models/unet as well as models/diffusion_models.
    assert COMFY_WAN21_GGUF in required["diffusion_model"][1]["options"]
    assert required["diffusion_model_2"][1]["options"][0] == "none"
    assert required["clip_vision"][1]["options"][0] == "none"
    assert FILES["vae"] in required["vae"][1]["options"]
    loader = info["VRAMWiseModelLoader"]["input"]["required"]
    for name in ("offload_mode", "weight_dtype"):
        assert required[name][1]["options"] == loader[name][1]["options"]
        assert required[name][1]["default"] == loader[name][1]["default"]


def test_runs_from_single_files(comfy_server):
    entry = comfy_server.run(_prompt())
    assert entry.get("status", {}).get("status_str") == "success", execution_error(entry)
    assert len(saved_files(entry)) == 1
    assert "Wan2.1 I2V" in entry["outputs"]["2"]["text"][0]


def test_runs_from_a_gguf_diffusion_model(comfy_server):
    entry = comfy_server.run(_prompt(diffusion_model=COMFY_WAN21_GGUF))
    assert entry.get("status", {}).get("status_str") == "success", execution_error(entry)
    assert COMFY_WAN21_GGUF in entry["outputs"]["2"]["text"][0]


def test_gguf_with_fp8_weights_is_a_clear_error(comfy_server):
    graph = _prompt(diffusion_model=COMFY_WAN21_GGUF)
    graph["2"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    err = execution_error(comfy_server.run(graph))
    assert err is not None and "weight_dtype" in err["exception_message"] and "GGUF" in err["exception_message"]


def test_wan21_without_clip_vision_is_a_clear_error(comfy_server):
    entry = comfy_server.run(_prompt(clip_vision="none"))
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "VRAMWiseCheckpointLoader"
    assert "clip_vision" in err["exception_message"] and "clip_vision_h.safetensors" in err["exception_message"]


def test_compile_input_is_appended_with_the_model_loaders_options(comfy_server):
    from workflow_api import widget_names

    info = comfy_server.object_info()
    names = widget_names(info["VRAMWiseCheckpointLoader"])
    # Appended after every earlier widget, so workflows saved before it keep their values in place.
    assert names[-2:] == ["text_encoder_on_cpu", "compile"]
    ours = info["VRAMWiseCheckpointLoader"]["input"]["optional"]["compile"]
    assert ours == info["VRAMWiseModelLoader"]["input"]["optional"]["compile"]


def test_compile_choice_reaches_the_stream_engine(comfy_server):
    graph = _prompt()
    graph["2"]["inputs"].update(offload_mode="stream", compile="off")
    entry = comfy_server.run(graph)
    assert entry.get("status", {}).get("status_str") == "success", execution_error(entry)
    assert "compile: off, denoiser runs eager" in entry["outputs"]["2"]["text"][0]


def _loader_refusal(comfy_server, value: str) -> str:
    err = execution_error(comfy_server.run(_prompt(diffusion_model=value)))
    assert err is not None and err["node_type"] == "VRAMWiseCheckpointLoader"
    return err["exception_message"]


def test_paths_outside_the_listing_are_refused_with_one_message(comfy_server, tmp_path):
    from safetensors.torch import save_file
    import torch

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    messages = {
        _loader_refusal(comfy_server, value)
        for value in ("/etc/passwd", "/etc/vramwise-no-such-file", "../../../../etc/passwd",
                      "../../../../etc/vramwise-no-such-file", str(outside), str(tmp_path / "missing.safetensors"))
    }
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("diffusion_model:") and "pick a file from the list" in message
    assert "passwd" not in message and "Traceback" not in message


def test_a_file_symlinked_into_the_models_folder_from_elsewhere_runs(comfy_server, tmp_path):
    real = comfy_server.models_dir / "diffusion_models" / FILES["diffusion_model"]
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    target = elsewhere / "moved.safetensors"
    target.write_bytes(real.read_bytes())
    link = comfy_server.models_dir / "diffusion_models" / "linked_from_elsewhere.safetensors"
    link.symlink_to(target)
    try:
        entry = comfy_server.run(_prompt(diffusion_model=link.name))
        assert entry.get("status", {}).get("status_str") == "success", execution_error(entry)
    finally:
        link.unlink()
