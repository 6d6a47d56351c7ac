"""Wan VAE from a single file: ComfyUI's ``wan_2.1_vae.safetensors`` (original layout, renamed by diffusers'
own ``convert_wan_vae_to_diffusers``), ``wan2.2_vae.safetensors`` (original residual layout, renamed by our
``keys.wan22_vae_to_diffusers``: diffusers 0.42.1 has no converter for it), or a file already in diffusers'
AutoencoderKLWan layout.

Structure constants (stage multipliers, res blocks per stage, temporal downsampling, latent statistics) come from
the shipped config of the published VAE; widths, channels and latent size from the file's shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .build import materialize
from .detect import shipped_config
from .reader import Header, load_tensors, read_header, weight_names


def _z_dim(t: dict) -> int | None:
    for k in ("post_quant_conv.weight", "conv2.weight"):
        if k in t:
            return int(t[k].shape[0])
    return None


def vae_config(header: Header) -> tuple[dict[str, Any], str]:
    """(AutoencoderKLWan config, layout): layout is "wan2.1" / "wan2.2" (original names) or "diffusers"."""
    t = header.tensors
    original = "encoder.conv1.weight" in t
    diffusers_layout = "encoder.conv_in.weight" in t
    residual = any(k.startswith(("encoder.downsamples.0.downsamples.", "encoder.down_blocks.0.resnets.")) for k in t)
    z = _z_dim(t)
    if not (original or diffusers_layout) or z is None:
        raise InputError("vae", f"'{header.path.name}' is not a Wan VAE.", "pick wan_2.1_vae.safetensors (or wan2.2_vae.safetensors for TI2V-5B).")
    config = dict(shipped_config("wan2.2-vae.json" if residual else "wan2.1-vae.json"))
    conv_in = t["encoder.conv1.weight" if original else "encoder.conv_in.weight"].shape
    dec_in = t.get("decoder.conv1.weight" if original else "decoder.conv_in.weight")
    head = t.get("decoder.head.2.weight" if original else "decoder.conv_out.weight")
    config["base_dim"] = int(conv_in[0])
    config["z_dim"] = z
    if residual:
        if dec_in is None or head is None:
            raise InputError("vae", f"'{header.path.name}' lacks the decoder tensors of a Wan VAE.", "download the VAE again.")
        config["in_channels"] = int(conv_in[1])
        config["out_channels"] = int(head.shape[0])
        config["patch_size"] = int(round((config["in_channels"] / 3) ** 0.5))
        config["decoder_base_dim"] = int(dec_in.shape[0]) // int(config["dim_mult"][-1])
        config["scale_factor_spatial"] = config["patch_size"] * 2 ** (len(config["dim_mult"]) - 1)
    config.update(header.config_overrides("vae"))
    if not original:
        return config, "diffusers"
    return config, ("wan2.2" if residual else "wan2.1")


def original_name_map(names: list[str], layout: str) -> dict[str, str]:
    """{diffusers name: stored name} for a VAE file in an original layout."""
    if layout == "wan2.2":
        from .keys import wan22_vae_to_diffusers

        return {wan22_vae_to_diffusers(n): n for n in names}
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return dict(convert_wan_vae_to_diffusers({n: n for n in names}))


def load_vae(path: Path, dtype: torch.dtype, z_dim: int | None = None):
    from diffusers import AutoencoderKLWan

    path = Path(path)
    header = read_header(path)
    config, layout = vae_config(header)
    if z_dim is not None and int(config["z_dim"]) != int(z_dim):
        raise InputError(
            "vae",
            f"'{path.name}' has {config['z_dim']} latent channels, the diffusion model works with {z_dim}.",
            "Wan2.1 and Wan2.2 A14B use wan_2.1_vae.safetensors; Wan2.2 TI2V-5B uses wan2.2_vae.safetensors.",
        )
    names = {n: n for n in weight_names(header)}
    if layout != "diffusers":
        names = original_name_map(list(names), layout)
    state = load_tensors(path, names, dtype)
    return materialize(lambda: AutoencoderKLWan.from_config(config), state, path, "Wan VAE")
