"""UMT5 text encoder + tokenizer from ComfyUI's ``umt5_xxl_*.safetensors``.

The Comfy files use transformers' UMT5EncoderModel names (``shared.weight``, ``encoder.block.N.layer...``),
so no renaming is needed; ``encoder.embed_tokens`` is tied to ``shared``. The tokenizer's SentencePiece model
travels inside the file as the uint8 tensor ``spiece_model``; it is written to a cache folder as
``spiece.model`` and loaded with ``from_pretrained`` (``T5Tokenizer(vocab_file=...)`` silently ignores it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelFolderError
from ..precision import TEXT_ENCODER_FP8_SKIP
from .build import keep_fp32_patterns, keeps_fp32, materialize
from .detect import shipped_config
from .reader import Header, load_tensors, matches_any, read_header, weight_names

_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer.")
_TOKENIZER_FOLDER_HELP = (
    "put a tokenizer folder (holding spiece.model or tokenizer.json of google/umt5-xxl) next to the file, "
    "named '<file name without extension>_tokenizer', or use a Comfy umt5_xxl file that embeds it"
)


def text_encoder_config(header: Header) -> dict[str, Any]:
    if header.kind == "gguf":
        # transformers can read a UMT5 GGUF (umt5-xxl-encoder-Q8_0.gguf and friends), but it dequantizes every
        # tensor while loading: the encoder then takes the same memory as umt5_xxl_fp16 (~11 GB in bf16), so
        # GGUF buys nothing here, and fp8 storage (umt5_xxl_fp8_e4m3fn_scaled) halves it for real.
        raise InputError(
            "text_encoder",
            f"'{header.path.name}' is a GGUF text encoder; only the diffusion model may be GGUF (a GGUF UMT5 would "
            "be dequantized whole while loading and save no memory).",
            "pick umt5_xxl_fp8_e4m3fn_scaled.safetensors (about 6.7 GB, stored in fp8) or umt5_xxl_fp16.safetensors; "
            "turn on text_encoder_on_cpu to keep it off the GPU.",
        )
    t = header.tensors
    get = lambda k: t[k].shape if k in t else None  # noqa: E731
    shared = get("shared.weight") or get("encoder.embed_tokens.weight")
    rel = get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wi = get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if not (shared and rel and q and wi):
        raise ModelFolderError(
            f"'{header.path.name}' is not a UMT5 text encoder (the Wan text encoder, umt5_xxl_*.safetensors): "
            "it lacks shared/relative_attention_bias/q/wi_0 weights of every UMT5 layer."
        )
    layers = len({k.split(".")[2] for k in t if k.startswith("encoder.block.")})
    config = dict(shipped_config("umt5-xxl.json"))
    config.update(
        vocab_size=shared[0], d_model=shared[1], relative_attention_num_buckets=rel[0], num_heads=rel[1],
        d_kv=q[0] // rel[1], d_ff=wi[0], num_layers=layers,
    )
    config.update(header.config_overrides("text_encoder"))
    return config


def _stripped(header: Header) -> dict[str, str]:
    out = {}
    for name in weight_names(header):
        short = name
        for p in _PREFIXES:
            if name.startswith(p):
                short = name[len(p):]
                break
        out[short] = name
    return out


def check_text_dim(header: Header, text_dim: int) -> int:
    config = text_encoder_config(header)
    if int(config["d_model"]) != int(text_dim):
        raise InputError(
            "text_encoder",
            f"'{header.path.name}' has hidden size {config['d_model']}, but the diffusion model expects {text_dim} "
            "(Wan models use UMT5-XXL, 4096).",
            "pick umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors (not a T5/CLIP/Llama text encoder).",
        )
    return int(config["d_model"])


def load_text_encoder(path: Path, dtype: torch.dtype, keep_fp8: bool = False):
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    header = read_header(path)
    header.tensors = {k: v for k, v in header.tensors.items()}
    names = _stripped(header)
    shaped = Header(header.path, {s: header.tensors[n] for s, n in names.items()}, header.metadata, header.kind)
    config = text_encoder_config(shaped)
    patterns = keep_fp32_patterns(UMT5EncoderModel)
    state = load_tensors(
        path, names, dtype,
        keep_fp32=lambda n: keeps_fp32(n, patterns, dtype),
        keep_fp8=lambda n: keep_fp8 and not matches_any(n, TEXT_ENCODER_FP8_SKIP),
    )
    cfg = UMT5Config(**config)
    model = materialize(
        lambda: UMT5EncoderModel(cfg), state, path, "UMT5 text encoder",
        tied={"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"},
    )
    return model


def _cache_dir() -> Path:
    base = os.environ.get("VRAMWISE_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "vramwise-cache")
    return Path(base)


def load_tokenizer(path: Path):
    """The UMT5 tokenizer embedded in the file, or from a '<stem>_tokenizer' folder next to it."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, T5Tokenizer

    path = Path(path)
    side = path.with_name(path.stem + "_tokenizer")
    if side.is_dir():
        return AutoTokenizer.from_pretrained(str(side))
    header = read_header(path)
    if "spiece_model" not in header.tensors:
        raise InputError(
            "text_encoder",
            f"'{path.name}' carries no tokenizer (no 'spiece_model' tensor), so prompts cannot be tokenized.",
            _TOKENIZER_FOLDER_HELP + f" (here: '{side}').",
        )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        data = f.get_tensor("spiece_model").to(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = _cache_dir() / f"umt5-tokenizer-{digest}"
    if not (folder / "spiece.model").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"spiece.model.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / "spiece.model")
    try:
        import google.protobuf  # noqa: F401  (transformers' own SentencePiece conversion needs it)

        return T5Tokenizer.from_pretrained(str(folder), extra_ids=0, model_max_length=512)
    except ImportError:
        pass
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on bad data
        raise ModelFolderError(f"'{path.name}': its embedded tokenizer (spiece_model) cannot be read: {e}") from e
    # Without protobuf: read pieces and scores with sentencepiece and build the same unigram tokenizer in memory.
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
        pieces = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    except Exception as e:
        raise ModelFolderError(f"'{path.name}': its embedded tokenizer (spiece_model) cannot be read: {e}") from e
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
