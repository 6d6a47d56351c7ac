"""Write tiny checkpoints in ComfyUI's single-file layouts from the tiny diffusers models.

Transformer: original Wan names (optionally prefixed ``model.diffusion_model.``), in fp32/bf16, plain fp8 or
fp8_scaled. Text encoder: transformers' UMT5 names plus the tokenizer as a ``spiece_model`` uint8 tensor
(a SentencePiece model serialized here from the tiny tokenizer's unigram vocab). CLIP vision: transformers'
names. VAE: either the tiny folder's VAE in diffusers' layout (one res block per stage, a structure the
original-layout converter of diffusers does not express), or a tiny Wan2.1-structured VAE (dim_mult 1,2,4,4 and two
res blocks per stage, like wan_2.1_vae.safetensors) in the original layout with no metadata at all. GGUF: the
transformer in the original layout, F16 or quantized with gguf's own ``quantize`` (K-quants, which gguf cannot write,
with ``quantize_k``). Constants shapes cannot reveal
go in ``vramwise_config`` metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vramwise.single_file.keys import transformer_to_original, wan21_vae_to_original, wan22_vae_to_original
from vramwise.single_file.scaled_fp8 import scale_weights

PREFIX = "model.diffusion_model."


def _meta(component: str, values: dict) -> dict[str, str]:
    return {"vramwise_config": json.dumps({component: values})}


def diffusers_state(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((Path(folder) / component).glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_transformer(
    folder: Path, out: Path, *, component: str = "transformer", variant: str = "fp32", prefix: str = PREFIX
) -> Path:
    """variant: fp32 | bf16 | fp8_e4m3fn (plain: matrices fp8, vectors bf16) | fp8_scaled."""
    config = json.loads((Path(folder) / component / "config.json").read_text())
    state = {transformer_to_original(k, prefix): v.float() for k, v in diffusers_state(folder, component).items()}
    if variant == "bf16":
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    elif variant == "fp8_e4m3fn":
        state = {k: (v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v.to(torch.bfloat16)) for k, v in state.items()}
    elif variant == "fp8_scaled":
        state = scale_weights(state)
    meta = _meta("transformer", {"attention_head_dim": config["attention_head_dim"], "rope_max_seq_len": config["rope_max_seq_len"]})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    return out


def write_transformer_gguf(
    folder: Path, out: Path, qtype: str = "F16", *, component: str = "transformer", prefix: str = "", flatten_5d: bool = False
) -> Path:
    """The tiny transformer as a GGUF file in the original layout, as city96-style converters write Wan models.

    qtype F16: every tensor of 2+ dims in F16. Q8_0 (or another gguf quant type): tensors of 2+ dims whose rows
    split into whole quant blocks are quantized with ``gguf.quants.quantize``, the others stay F16 (the tiny
    model's 24-wide rows do not fit 32-value Q8_0 blocks: only the 32-wide inputs get quantized); vectors stay F32.
    flatten_5d: store 5-D tensors (the patch embedding) as 2-D with their real shape in
    ``comfy.gguf.orig_shape.<name>`` (GGML tensors have at most 4 dims; converters for ComfyUI do this).
    """
    import gguf
    import numpy as np

    config = json.loads((Path(folder) / component / "config.json").read_text())
    quant = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[quant][0]
    writer = gguf.GGUFWriter(str(out), "wan")
    writer.add_string("vramwise_config", json.dumps({"transformer": {
        "attention_head_dim": config["attention_head_dim"], "rope_max_seq_len": config["rope_max_seq_len"]}}))
    for name, v in diffusers_state(folder, component).items():
        data = v.float().numpy()
        key = transformer_to_original(name, prefix)
        if flatten_5d and data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in data.shape])
            data = data.reshape(data.shape[0], -1)
        if data.ndim < 2:
            writer.add_tensor(key, data.astype(np.float32))
        elif quant in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) or data.shape[-1] % block:
            writer.add_tensor(key, data.astype(np.float16))
        else:
            blocks = quantize_k(data, qtype) if qtype in K_QUANTS else gguf.quants.quantize(data, quant)
            writer.add_tensor(key, blocks, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# K-quants: super-blocks of 256 values. gguf-py (0.19) dequantizes them but its quantize() raises
# NotImplementedError, so the blocks are built here following ggml's documented layouts (ggml-common.h):
#   Q4_K (144 B): d f16, dmin f16, scales[12] (8 sub-blocks of 32: 6-bit scale + 6-bit min), qs[128] 4-bit
#   Q5_K (176 B): d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
#   Q6_K (210 B): ql[128] low 4 bits, qh[64] high 2 bits, scales[16] int8 (16 sub-blocks of 16), d f16
# A simple min/max quantizer (not llama.cpp's error-minimising search): the layout is what the tests check.
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
QK_K = 256


def _pack_scales_k4(sc, m):
    """ggml's 12-byte packing of 8 six-bit scales and mins (inverse of get_scale_min_k4)."""
    import numpy as np

    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def quantize_k(data, qtype: str):
    """Rows of ``data`` (width a multiple of 256) as Q4_K / Q5_K / Q6_K blocks, uint8 [rows, blocks * bytes]."""
    import numpy as np

    rows = data.shape[:-1]
    x = np.asarray(data, dtype=np.float32).reshape(-1, QK_K)
    n = x.shape[0]
    f16 = lambda v: v.astype(np.float16).view(np.uint8).reshape(n, 2)  # noqa: E731
    if qtype in ("Q4_K", "Q5_K"):
        levels = 15 if qtype == "Q4_K" else 31
        sub = x.reshape(n, 8, 32)
        lo = np.minimum(sub.min(-1), 0.0)
        scale = (sub.max(-1) - lo) / levels
        d = scale.max(-1) / 63.0
        dmin = (-lo).max(-1) / 63.0
        d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
        sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None].astype(np.float32)), 0, 63).astype(np.uint8)
        m = np.clip(np.round(-lo / np.where(dmin16 > 0, dmin16, 1)[:, None].astype(np.float32)), 0, 63).astype(np.uint8)
        eff_scale = d16.astype(np.float32)[:, None] * sc
        eff_min = dmin16.astype(np.float32)[:, None] * m
        q = np.round((sub + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None])
        q = np.clip(q, 0, levels).astype(np.uint8).reshape(n, 4, 2, 32)  # (pair i, low/high sub-block, l)
        qs = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(n, 128)
        parts = [f16(d16), f16(dmin16), _pack_scales_k4(sc, m)]
        if qtype == "Q5_K":
            hi = (q >> 4) & 1  # bit 2i of qh[l]: sub-block 2i, bit 2i+1: sub-block 2i+1
            qh = np.zeros((n, 32), dtype=np.uint8)
            for i in range(4):
                qh |= (hi[:, i, 0] << (2 * i)) | (hi[:, i, 1] << (2 * i + 1))
            parts.append(qh)
        parts.append(qs)
    elif qtype == "Q6_K":
        sub = x.reshape(n, 16, 16)
        scale = np.abs(sub).max(-1) / 31.0
        d16 = (scale.max(-1) / 127.0).astype(np.float16)
        sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None].astype(np.float32)), 0, 127).astype(np.int8)
        eff = d16.astype(np.float32)[:, None] * sc
        q = np.clip(np.round(sub / np.where(eff > 0, eff, 1)[..., None]), -32, 31).astype(np.int16) + 32
        q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # (half, quarter, l): value 128*half + 32*quarter + l
        ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=-1)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), f16(d16)]
    else:
        raise ValueError(f"not a K-quant: {qtype}")
    return np.concatenate(parts, axis=-1).reshape(*rows, -1)


def tiny_wan21_vae():
    """A tiny AutoencoderKLWan with the published Wan2.1 structure (dim_mult 1,2,4,4, two res blocks per stage)."""
    from diffusers import AutoencoderKLWan

    state = torch.random.get_rng_state()
    torch.manual_seed(2101)
    try:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    finally:
        torch.random.set_rng_state(state)
    # gamma scales are initialised to ones; random ones make a wrong norm mapping visible in the output.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for n, p in vae.named_parameters():
            if n.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return vae.eval()


def tiny_wan22_vae():
    """A tiny residual AutoencoderKLWan with the published Wan2.2 structure (patchify 2, 48 latent channels,
    decoder wider than the encoder)."""
    from diffusers import AutoencoderKLWan

    state = torch.random.get_rng_state()
    torch.manual_seed(2202)
    try:
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            scale_factor_temporal=4, scale_factor_spatial=16,
        )
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        g = torch.Generator().manual_seed(8)
        for n, p in vae.named_parameters():
            if n.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return vae.eval()


def write_wan22_vae_original(vae, out: Path, dtype=torch.float32) -> Path:
    """``vae`` in the original key layout of wan2.2_vae.safetensors, no metadata."""
    names = wan22_vae_to_original(list(vae.state_dict()))
    save_file({names[k]: v.to(dtype).contiguous() for k, v in vae.state_dict().items()}, str(out))
    return out


def write_wan21_vae_original(vae, out: Path, dtype=torch.float32) -> Path:
    """``vae`` in the original key layout of wan_2.1_vae.safetensors, no metadata (as users have it)."""
    state = {wan21_vae_to_original(k): v.to(dtype).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out))
    return out


# --- a SentencePiece ModelProto, serialized by hand (protobuf wire format) ---
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def spiece_model_bytes(tokenizer_json: Path) -> bytes:
    """Unigram SentencePiece model with the vocab and scores of a tokenizers' Unigram tokenizer.json."""
    model = json.loads(Path(tokenizer_json).read_text())["model"]
    special = {"<pad>": 3, "</s>": 3, "<unk>": 2}  # CONTROL=3, UNKNOWN=2, NORMAL=1, UNUSED=5
    vocab = [list(x) for x in model["vocab"]]
    # SentencePiece refuses duplicate pieces; tokenizers keeps the last one: park earlier copies as unused.
    last = {piece: i for i, (piece, _) in enumerate(vocab)}
    for i, (piece, _) in enumerate(vocab):
        if last[piece] != i:
            vocab[i] = [f"<unused_{i}>", 0.0]
            special[f"<unused_{i}>"] = 5  # UNUSED
    proto = b""
    for piece, score in vocab:
        body = _bytes_field(1, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(special.get(piece, 1)))
        proto += _bytes_field(1, body)
    trainer = (
        _field(3, 0, _varint(1)) + _field(4, 0, _varint(len(model["vocab"])))
        + _field(40, 0, _varint(2)) + _field(41, 0, _varint(-1)) + _field(42, 0, _varint(1)) + _field(43, 0, _varint(0))
    )
    normalizer = _bytes_field(1, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(1)) + _field(5, 0, _varint(1))
    return proto + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


def write_text_encoder(folder: Path, out: Path, *, with_spiece: bool = True, dtype=torch.float32) -> Path:
    cfg = json.loads((Path(folder) / "text_encoder" / "config.json").read_text())
    state = {k: v.to(dtype) for k, v in diffusers_state(folder, "text_encoder").items() if k != "encoder.embed_tokens.weight"}
    if with_spiece:
        data = spiece_model_bytes(Path(folder) / "tokenizer" / "tokenizer.json")
        state["spiece_model"] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    meta = _meta("text_encoder", {"relative_attention_max_distance": cfg["relative_attention_max_distance"]})
    save_file(state, str(out), metadata=meta)
    return out


def write_clip_vision(folder: Path, out: Path) -> Path:
    cfg = json.loads((Path(folder) / "image_encoder" / "config.json").read_text())
    # Comfy's clip_vision_h.safetensors names start with 'vision_model.' (transformers 5 saves without it).
    state = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in diffusers_state(folder, "image_encoder").items()}
    keep = ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")
    save_file(state, str(out), metadata=_meta("clip_vision", {k: cfg[k] for k in keep}))
    return out


def write_vae(folder: Path, out: Path) -> Path:
    cfg = {k: v for k, v in json.loads((Path(folder) / "vae" / "config.json").read_text()).items() if not k.startswith("_")}
    save_file(diffusers_state(folder, "vae"), str(out), metadata=_meta("vae", cfg))
    return out


def write_wan21_set(folder: Path, out_dir: Path, names: dict[str, str] | None = None, variant: str = "fp32") -> dict[str, Path]:
    """Transformer, text encoder, CLIP vision and VAE files of a tiny Wan2.1 I2V folder."""
    names = names or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "diffusion_model": write_transformer(folder, out_dir / names.get("diffusion_model", f"wan21_i2v_{variant}.safetensors"), variant=variant),
        "text_encoder": write_text_encoder(folder, out_dir / names.get("text_encoder", "umt5_tiny.safetensors")),
        "clip_vision": write_clip_vision(folder, out_dir / names.get("clip_vision", "clip_vision_tiny.safetensors")),
        "vae": write_vae(folder, out_dir / names.get("vae", "wan_vae_tiny.safetensors")),
    }


# The usual ComfyUI file names, as in workflows/wan21_i2v_comfy_files.json.
COMFY_WAN21_NAMES = {
    "diffusion_model": ("diffusion_models", "wan2.1_i2v_480p_14B_bf16.safetensors"),
    "text_encoder": ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "clip_vision": ("clip_vision", "clip_vision_h.safetensors"),
    "vae": ("vae", "wan_2.1_vae.safetensors"),
}


COMFY_WAN21_GGUF = "wan2.1-i2v-14b-480p-Q8_0.gguf"


def write_comfy_models(tiny_wan21: Path, models_dir: Path) -> dict[str, Path]:
    """Tiny Wan2.1 I2V stand-ins under ComfyUI's folders and the real file names (bf16 transformer)."""
    out = {}
    for key, (sub, name) in COMFY_WAN21_NAMES.items():
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
        path = models_dir / sub / name
        if key == "diffusion_model":
            write_transformer(tiny_wan21, path, variant="bf16")
        elif key == "text_encoder":
            write_text_encoder(tiny_wan21, path, dtype=torch.bfloat16)
        elif key == "clip_vision":
            write_clip_vision(tiny_wan21, path)
        else:  # the original-layout Wan2.1 VAE, so the server runs the conversion users go through
            write_wan21_vae_original(tiny_wan21_vae(), path, dtype=torch.bfloat16)
        out[key] = path
    # A quantized diffusion model in models/unet (the other folder of 'diffusion_models'), for the listing.
    (models_dir / "unet").mkdir(parents=True, exist_ok=True)
    out["gguf"] = write_transformer_gguf(tiny_wan21, models_dir / "unet" / COMFY_WAN21_GGUF, "Q8_0", flatten_5d=True)
    return out


def wide_wan21_folder(src: Path, dst: Path) -> Path:
    """The tiny Wan2.1 I2V folder with a transformer whose FFN and time-embedding inputs are 256 wide (ffn_dim,
    freq_dim 256), so those rows fill whole K-quant super-blocks; every other component is the tiny one (linked)."""
    from diffusers import WanTransformer3DModel

    dst.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.name != "transformer":
            (dst / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    config = {k: v for k, v in json.loads((Path(src) / "transformer" / "config.json").read_text()).items() if not k.startswith("_")}
    state = torch.random.get_rng_state()
    torch.manual_seed(256)
    try:
        model = WanTransformer3DModel.from_config({**config, "ffn_dim": QK_K, "freq_dim": QK_K})
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(dst / "transformer", safe_serialization=True)
    return dst
