"""Original (ComfyUI / Wan repo) tensor names <-> diffusers module names.

Forward: diffusers' own ``convert_wan_transformer_to_diffusers`` is *called* on a {name: name} dict, so only
names move (no tensor is touched or copied), plus the FLF2V position embedding that converter leaves out.
Inverse: written here for tools and tests (the tiny diffusers models -> Comfy-layout files).
"""

from __future__ import annotations

import re

from ..errors import ModelFolderError

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Renames the diffusers converter does not do (as of 0.42.1).
_EXTRA_FORWARD = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}


def transformer_name_map(original_names: list[str]) -> dict[str, str]:
    """{diffusers name: original name} for a Wan transformer file's tensor names (prefix optional)."""
    try:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    except ImportError as e:  # pragma: no cover - depends on the installed diffusers
        raise ModelFolderError(f"This diffusers version cannot convert Wan single files ({e}); update diffusers.") from e
    identity = {name: name for name in original_names}
    converted = convert_wan_transformer_to_diffusers(dict(identity))
    out = {}
    for new, orig in converted.items():
        out[_EXTRA_FORWARD.get(new, new)] = orig
    return out


_INVERSE_RULES: list[tuple[str, str]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def transformer_to_original(name: str, prefix: str = "") -> str:
    """A diffusers WanTransformer3DModel parameter name in the original layout."""
    out = name
    for pattern, repl in _INVERSE_RULES:
        out = re.sub(pattern, repl, out)
    # diffusers' norm2 is the original norm3 (cross-attention norm) and the other way round.
    out = re.sub(r"^(blocks\.\d+)\.norm([23])\.", lambda m: f"{m.group(1)}.norm{5 - int(m.group(2))}.", out)
    return prefix + out


# --- Wan2.1 VAE (AutoencoderKLWan, is_residual=False): diffusers names -> original names ---
# The original decoder keeps one flat list per stage: (num_res_blocks + 1) residual blocks, then the upsampler;
# with the published num_res_blocks=2 that is 4 entries per stage (the layout diffusers' converter assumes).
_VAE_RESNET_PARTS = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}
_VAE_TOP = {
    "quant_conv.": "conv1.", "post_quant_conv.": "conv2.",
    "encoder.conv_in.": "encoder.conv1.", "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.": "encoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
    "decoder.norm_out.": "decoder.head.0.", "decoder.conv_out.": "decoder.head.2.",
}


def _resnet_part(rest: str) -> str:
    for new, old in _VAE_RESNET_PARTS.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest  # resample / time_conv keep their names


def wan21_vae_to_original(name: str, resnets_per_up_block: int = 3) -> str:
    """A diffusers AutoencoderKLWan (Wan2.1 structure) parameter name in the original Wan / ComfyUI layout."""
    for new, old in _VAE_TOP.items():
        if name.startswith(new):
            return old + name[len(new):]
    m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    if m:
        side, kind, i, rest = m.groups()
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * int(i)}.{_resnet_part(rest)}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", name)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_resnet_part(m.group(2))}"
    stride = resnets_per_up_block + 1
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", name)
    if m:
        b, r, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"decoder.upsamples.{stride * b + r}.{_resnet_part(rest)}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", name)
    if m:
        return f"decoder.upsamples.{stride * int(m.group(1)) + resnets_per_up_block}.{m.group(2)}"
    return name


# --- Wan2.2 VAE (AutoencoderKLWan, is_residual=True) ---
# Original layout (Wan2.2 repo / ComfyUI's wan2.2_vae.safetensors): every stage is a module holding its own list,
# ``encoder.downsamples.{i}.downsamples.{j}`` / ``decoder.upsamples.{i}.upsamples.{j}``: the residual blocks, then
# (except in the last stage) the resampler at the next index. diffusers names the same modules
# ``down_blocks.{i}.resnets.{j}`` + ``down_blocks.{i}.downsampler`` (``up_blocks`` / ``upsampler`` in the decoder).
# Top-level convs, heads and middle blocks are named as in Wan2.1. diffusers 0.42.1 has no converter for this one.
_VAE_TOP_FORWARD = {old: new for new, old in _VAE_TOP.items()}
_VAE_RESNET_FORWARD = {old: new for new, old in _VAE_RESNET_PARTS.items()}


def _resnet_part_forward(rest: str) -> str:
    for old, new in _VAE_RESNET_FORWARD.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def wan22_vae_to_diffusers(name: str) -> str:
    """An original Wan2.2 VAE tensor name in diffusers' AutoencoderKLWan(is_residual=True) naming."""
    m = re.match(r"^(encoder|decoder)\.middle\.(\d+)\.(.*)$", name)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if i == 1:
            return f"{side}.mid_block.attentions.0.{rest}"
        return f"{side}.mid_block.resnets.{i // 2}.{_resnet_part_forward(rest)}"
    m = re.match(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.*)$", name)
    if m:
        stage, i, rest = m.group(1), m.group(2), m.group(4)
        blocks, sampler = ("encoder.down_blocks", "downsampler") if stage.startswith("encoder") else ("decoder.up_blocks", "upsampler")
        if rest.startswith(("resample.", "time_conv.")):
            return f"{blocks}.{i}.{sampler}.{rest}"
        return f"{blocks}.{i}.resnets.{m.group(3)}.{_resnet_part_forward(rest)}"
    for old, new in _VAE_TOP_FORWARD.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def wan22_vae_to_original(names: list[str]) -> dict[str, str]:
    """{diffusers name: original name} for the parameters of a residual AutoencoderKLWan (tools and tests)."""
    resnets: dict[str, int] = {}
    for n in names:
        m = re.match(r"^((?:encoder\.down|decoder\.up)_blocks\.\d+)\.resnets\.(\d+)\.", n)
        if m:
            resnets[m.group(1)] = max(resnets.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for n in names:
        m = re.match(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.*)$", n)
        if m:
            kind, i, which, j, rest = m.groups()
            stage = "encoder.downsamples" if kind.startswith("encoder") else "decoder.upsamples"
            inner = stage.split(".")[1]
            if j is None:  # the resampler follows the residual blocks of its stage
                j, part = resnets[f"{kind}_blocks.{i}"], rest
            else:
                part = _resnet_part(rest)
            out[n] = f"{stage}.{i}.{inner}.{j}.{part}"
        else:
            out[n] = wan21_vae_to_original(n)
    return out
