"""Tiny random LoRA files in every key layout users have, for a given Wan transformer (tests, server, bench).

Layouts (``LAYOUTS``):
  comfy      ComfyUI / original Wan naming: diffusion_model.blocks.N.self_attn.q.lora_down/lora_up/alpha, .diff_b
  lightx2v   the lightx2v cfg/step distill file: comfy naming without alpha, .diff_b on every layer, LoRAs on the
             embedders and the head, and the extra keys diffusers ignores (norm .diff, blocks.N.diff_m)
  causvid    CausVid: lora_A/lora_B naming with alpha, time_projection and head LoRAs, .diff_b
  musubi     musubi-tuner / kohya: lora_unet_blocks_N_self_attn_q.lora_down/lora_up/alpha
  peft       diffusers / PEFT: transformer.blocks.N.attn1.to_q.lora_A/lora_B, alpha in the adapter metadata

Usage: python scripts/tiny_loras.py TRANSFORMER_FOLDER OUT.safetensors --layout lightx2v [--rank 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# original Wan name -> diffusers module name, per block
BLOCK_LINEARS = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
)
IMAGE_LINEARS = (("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"))
TOP_LINEARS = (
    ("head.head", "proj_out"), ("time_projection.1", "condition_embedder.time_proj"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
)
LAYOUTS = ("comfy", "lightx2v", "causvid", "musubi", "peft")


def _linears(transformer: torch.nn.Module, top: bool, image: bool = True) -> list[tuple[str, str, torch.nn.Linear]]:
    """(original name, diffusers name, module) of every LoRA target the layouts use (``image``: the I2V image
    projections too; a T2V LoRA has none)."""
    mods = dict(transformer.named_modules())
    out = []
    for i in range(len(transformer.blocks)):
        for orig, ours in BLOCK_LINEARS + (IMAGE_LINEARS if image else ()):
            m = mods.get(f"blocks.{i}.{ours}")
            if isinstance(m, torch.nn.Linear):
                out.append((f"blocks.{i}.{orig}", f"blocks.{i}.{ours}", m))
    if top:
        for orig, ours in TOP_LINEARS:
            m = mods.get(ours)
            if isinstance(m, torch.nn.Linear):
                out.append((orig, ours, m))
    return out


def make_lora(transformer: torch.nn.Module, layout: str, rank: int = 4, seed: int = 0, scale: float = 0.2,
              dtype: torch.dtype = torch.bfloat16, blocks: list[int] | None = None,
              extra_blocks: list[int] = (), t2v: bool = False) -> tuple[dict, dict]:
    """A random LoRA state dict (and safetensors metadata) for ``transformer`` in ``layout``; ``blocks`` limits
    it to some blocks, ``extra_blocks`` adds a self-attention q LoRA on blocks the model does not have."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout}")
    g = torch.Generator().manual_seed(seed)
    top = layout in ("lightx2v", "causvid")
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"format": "pt"}
    alpha = float(rank) / 2

    def rnd(*shape, s=scale):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    for orig, ours, m in _linears(transformer, top, image=not t2v):
        if blocks is not None and orig.startswith("blocks.") and int(orig.split(".")[1]) not in blocks:
            continue
        down, up = rnd(rank, m.in_features), rnd(m.out_features, rank)
        if layout == "peft":
            sd[f"transformer.{ours}.lora_A.weight"] = down
            sd[f"transformer.{ours}.lora_B.weight"] = up
            continue
        if layout == "musubi":
            base = "lora_unet_" + orig.replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
            sd[f"{base}.alpha"] = torch.tensor(alpha)
            continue
        base = f"diffusion_model.{orig}"
        names = ("lora_A", "lora_B") if layout == "causvid" else ("lora_down", "lora_up")
        sd[f"{base}.{names[0]}.weight"], sd[f"{base}.{names[1]}.weight"] = down, up
        if layout in ("comfy", "causvid") and orig.startswith("blocks."):
            # diffusers' conversion reads .alpha on block layers only (an alpha on the head or embedders raises)
            sd[f"{base}.alpha"] = torch.tensor(alpha)
        # .diff_b on every layer or none: with it on some layers only, PEFT keeps the others' lora_B in the file's
        # bf16 and rounds their merged delta to bf16, so diffusers' own fused reference is then off by bf16 rounding.
        if layout in ("lightx2v", "causvid"):
            sd[f"{base}.diff_b"] = rnd(m.out_features, s=scale / 4)
    for i in extra_blocks:
        q = dict((o, m) for o, _, m in _linears(transformer, False))["blocks.0.self_attn.q"]
        base = f"diffusion_model.blocks.{i}.self_attn.q"
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = rnd(rank, q.in_features), rnd(q.out_features, rank)
    if layout == "peft":
        # diffusers writes the adapter's LoraConfig under the component's prefix
        targets = sorted({ours for _, ours, _ in _linears(transformer, top)})
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha,
                                                    "transformer.target_modules": targets})
    if layout == "lightx2v":
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        for i in range(len(transformer.blocks)):
            sd[f"diffusion_model.blocks.{i}.diff_m"] = rnd(1, 6, dim, s=scale / 10)
            for norm in ("cross_attn.norm_q", "cross_attn.norm_k", "norm3"):
                sd[f"diffusion_model.blocks.{i}.{norm}.diff"] = torch.zeros(dim, dtype=dtype)
            sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(dim, dtype=dtype)
    return sd, meta


def write_lora(transformer: torch.nn.Module, path: Path, layout: str, **kw) -> Path:
    from safetensors.torch import save_file

    sd, meta = make_lora(transformer, layout, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def write_wrong_lora(path: Path, dim: int = 40, blocks: int = 2, rank: int = 4) -> Path:
    """A comfy-layout LoRA for a Wan of another width: every key names a real layer, every shape is wrong."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(blocks):
        for orig, _ in BLOCK_LINEARS:
            sd[f"diffusion_model.blocks.{i}.{orig}.lora_down.weight"] = torch.randn(rank, dim, generator=g).bfloat16()
            sd[f"diffusion_model.blocks.{i}.{orig}.lora_up.weight"] = torch.randn(dim, rank, generator=g).bfloat16()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("transformer", type=Path, help="a diffusers transformer folder (config.json + weights)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layout", choices=LAYOUTS, default="lightx2v")
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args(argv)
    from diffusers import WanTransformer3DModel

    t = WanTransformer3DModel.from_pretrained(args.transformer)
    write_lora(t, args.out, args.layout, rank=args.rank)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
