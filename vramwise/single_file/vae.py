"""Wan VAE from a single file: ComfyUI's ``wan_2.1_vae.safetensors`` (original layout, renamed by diffusers'
own ``convert_wan_vae_to_diffusers``) or a file already in diffusers' AutoencoderKLWan layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelFolderError
from .build import materialize
from .detect import shipped_config
from .reader import Header, load_tensors, read_header, weight_names


def _z_dim(t: dict) -> int | None:
    for k in ("post_quant_conv.weight", "conv2.weight"):
        if k in t:
            return int(t[k].shape[0])
    return None


def vae_config(header: Header) -> tuple[dict[str, Any], bool]:
    """(AutoencoderKLWan config, whether the file is in the original layout)."""
    t = header.tensors
    original = "encoder.conv1.weight" in t
    diffusers_layout = "encoder.conv_in.weight" in t
    z = _z_dim(t)
    if not (original or diffusers_layout) or z is None:
        raise InputError("vae", f"'{header.path.name}' is not a Wan VAE.", "pick wan_2.1_vae.safetensors (or wan2.2_vae.safetensors for TI2V-5B).")
    overrides = header.config_overrides("vae")
    if z == 48 and original and not overrides:
        raise InputError(
            "vae",
            f"'{header.path.name}' is the Wan2.2 VAE (48 latent channels) in its original layout, which this "
            "diffusers version cannot convert yet.",
            "use the diffusers folder of Wan2.2-TI2V-5B with VRAMWise Model Loader.",
        )
    config = dict(shipped_config("wan2.1-vae.json"))
    conv_in = t["encoder.conv1.weight" if original else "encoder.conv_in.weight"]
    config["base_dim"] = int(conv_in.shape[0])
    config["z_dim"] = z
    config.update(overrides)
    return config, original


def load_vae(path: Path, dtype: torch.dtype, z_dim: int | None = None):
    from diffusers import AutoencoderKLWan

    path = Path(path)
    header = read_header(path)
    config, original = vae_config(header)
    if z_dim is not None and int(config["z_dim"]) != int(z_dim):
        raise InputError(
            "vae",
            f"'{path.name}' has {config['z_dim']} latent channels, the diffusion model works with {z_dim}.",
            "Wan2.1 and Wan2.2 A14B use wan_2.1_vae.safetensors; Wan2.2 TI2V-5B uses wan2.2_vae.safetensors.",
        )
    names = {n: n for n in weight_names(header)}
    if original:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        names = {new: old for new, old in convert_wan_vae_to_diffusers(dict(names)).items()}
    state = load_tensors(path, names, dtype)
    return materialize(lambda: AutoencoderKLWan.from_config(config), state, path, "Wan VAE")
