"""Write tiny checkpoints in ComfyUI's single-file layouts from the tiny diffusers models.

Transformer: original Wan names (optionally prefixed ``model.diffusion_model.``), in fp32/bf16, plain fp8 or
fp8_scaled. Text encoder: transformers' UMT5 names plus the tokenizer as a ``spiece_model`` uint8 tensor
(a SentencePiece model serialized here from the tiny tokenizer's unigram vocab). CLIP vision: transformers'
names. VAE: diffusers' layout (the tiny VAE has one res block per stage, a structure the original-layout
converter of diffusers does not express). Constants shapes cannot reveal go in ``vramwise_config`` metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vramwise.single_file.keys import transformer_to_original
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
        else:
            write_vae(tiny_wan21, path)
        out[key] = path
    return out
