"""Tiny random-weight checkpoints of every architecture comfyui-vramwise supports.

Tests and the demo must exercise the real diffusers classes and the same
``Pipeline.from_pretrained(folder)`` path users take, but real checkpoints are
tens of GB and cannot be downloaded here. So each architecture is built from
code with tiny hyperparameters (a few MB, random but seeded weights), in-memory
tokenizers, and saved with ``save_pretrained`` (safetensors) into a diffusers folder.

Folders (see ``BUILDERS``):
  tiny-wan21-i2v              Wan2.1 I2V (CLIP image encoder)           WanImageToVideoPipeline
  tiny-wan21-flf2v            Wan2.1 FLF2V (first + last frame)         WanImageToVideoPipeline
  tiny-wan22-i2v-a14b         Wan2.2 I2V-A14B (two experts, no CLIP)    WanImageToVideoPipeline
  tiny-wan22-ti2v-5b          Wan2.2 TI2V-5B (48-ch VAE, 16x spatial)   WanPipeline + expand_timesteps (as the hub)
  tiny-wan21-t2v              Wan2.1 T2V (only to test refusal)         WanPipeline (0.33-era model_index)
  tiny-wan22-t2v-a14b         Wan2.2 T2V-A14B (only to test refusal)    WanPipeline, two experts
  tiny-easyanimate-v51-inp    EasyAnimate V5.1 InP (Qwen2-VL text)      EasyAnimateInpaintPipeline
  tiny-easyanimate-v5-legacy  EasyAnimate V5 Bert+T5 layout, configs only (not loadable)
  tiny-i2vgenxl               I2VGen-XL                                 I2VGenXLPipeline

Usage: python scripts/tiny_models.py OUT_ROOT [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SEED = 20240601
STAMP_FILE = ".tiny_models.stamp"

# Wan2.2 checkpoints are sampled with a larger flow shift than Wan2.1 480P.
WAN21_FLOW_SHIFT = 3.0
WAN22_FLOW_SHIFT = 5.0
WAN22_BOUNDARY_RATIO = 0.9

# Shared tiny sizes. Wan's RoPE splits head_dim into 3 axes, so it must be a multiple of 6.
WAN_HEADS, WAN_HEAD_DIM = 2, 12
WAN_TEXT_DIM = 32  # UMT5 d_model; also the transformer's text_dim
CLIP_IMAGE_SIZE, CLIP_PATCH = 32, 8
WAN_CLIP_HIDDEN = 16
# CLIP tokens per image (patches + class token); FLF2V's learned image position embedding spans two images.
WAN_CLIP_TOKENS = (CLIP_IMAGE_SIZE // CLIP_PATCH) ** 2 + 1

# A small word list so ordinary prompts tokenize into word pieces rather than single characters;
# anything else still tokenizes (byte-level BPE) or maps to <unk> (UMT5), never crashes.
_WORDS = """
a an the of and or in on at to with from by for is are was be it its this that as up down into over under
cat cats dog dogs bird fish horse person people man woman girl boy child face hand hair eyes car boat train
tree trees flower flowers grass forest mountain mountains river lake sea ocean beach sky cloud clouds sun
moon star stars rain snow water fire light city street road house room window door table chair
red green blue yellow white black orange purple pink brown gray golden bright dark
walking running jumping flying swimming dancing sitting standing looking smiling talking moving turning
walks runs jumps flies swims dances sits stands looks smiles moves turns
slow fast slowly quickly gentle gently smooth camera pan zoom shot close view wide video image frame
high low quality best worst detailed detail realistic cinematic beautiful static still blurry blur noise
noisy distorted deformed ugly bad extra missing text watermark subtitles overexposed underexposed
astronaut robot dragon castle space planet night day morning evening sunset sunrise wind waves
""".split()

_PUNCT = list(".,!?;:'\"-()[]/&%#@*+=_<>~`$^|\\{}")
_DIGITS = list("0123456789")
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _seeded(tag: str) -> Iterator[None]:
    """Seed torch per component so each one's weights depend only on its tag, not on build order."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED + zlib.crc32(tag.encode()))
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, ordered by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _learn_bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list: repeatedly merge the most frequent adjacent pair.

    Learned (rather than hand-ordered) merges are self-consistent, so every listed word encodes to
    one token. Ties break on the pair itself, keeping the result deterministic.
    """
    seqs = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            counts.update(zip(seq, seq[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def _umt5_tokenizer():
    from transformers import T5Tokenizer

    # Unigram vocab, T5 order: <pad>=0, </s>=1, <unk>=2. Whole words score higher than spelling them out.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in _LETTERS + _DIGITS + _PUNCT:
        pieces.append((ch, -5.0))
        pieces.append(("\u2581" + ch, -4.0))
    for word in _WORDS:
        pieces.append(("\u2581" + word, -1.0))
    # extra_ids=0: sentinel tokens are a pretraining artifact the encoder never needs here.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab[tok] = len(vocab)
    # CLIP lowercases and marks the last symbol of each word with </w>.
    words = sorted({w.lower() for w in _WORDS if len(w) > 1})
    merges = _learn_bpe_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in words])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own template is not available offline; this one renders the same
# <|im_start|>role\n...<|im_end|> framing and accepts the list-of-parts content EasyAnimate sends.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_tokenizer():
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    space = alphabet[ord(" ")]  # byte-level stand-in for a leading space
    vocab: dict[str, int] = {}
    for tok in alphabet:
        vocab[tok] = len(vocab)
    # Chat-template role names are tokenized on every prompt.
    words = _WORDS + ["user", "assistant", "system"]
    merges = _learn_bpe_merges([list(w) for w in words if len(w) > 1] + [[space] + list(w) for w in words])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        extra_special_tokens=QWEN_SPECIALS[1:],
        model_max_length=1024,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    )


def _umt5_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=WAN_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    with _seeded("umt5"):
        return UMT5EncoderModel(config).eval()


def _wan_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=WAN_CLIP_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH,
        projection_dim=WAN_CLIP_HIDDEN,
    )
    with _seeded("wan-clip-vision"):
        return CLIPVisionModel(config).eval()


def _wan_transformer(tag: str, *, in_channels: int, out_channels: int, with_image: bool, flf2v: bool = False):
    from diffusers import WanTransformer3DModel

    inner = WAN_HEADS * WAN_HEAD_DIM
    with _seeded(tag):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=WAN_HEADS,
            attention_head_dim=WAN_HEAD_DIM,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=WAN_TEXT_DIM,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=WAN_CLIP_HIDDEN if with_image else None,
            # Without added K/V projections the attention processor treats CLIP tokens as text.
            added_kv_proj_dim=inner if with_image else None,
            rope_max_seq_len=1024,
            pos_embed_seq_len=2 * WAN_CLIP_TOKENS if flf2v else None,
        ).eval()


def _wan21_vae():
    from diffusers import AutoencoderKLWan

    # z_dim 16 keeps the default (real Wan2.1) latents_mean/std, which have exactly 16 entries.
    with _seeded("wan21-vae"):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()


def _wan22_vae():
    from diffusers import AutoencoderKLWan

    # Wan2.2 VAE: pixel patchify 2x2 (in/out 12 channels) + 3 down stages = 16x spatial, 48 latent channels.
    z_dim = 48
    with _seeded("wan22-vae"):
        return AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_temporal=4,
            scale_factor_spatial=16,
            # The defaults have 16 entries; the pipeline reshapes these to z_dim.
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        ).eval()


def _unipc_flow(shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )


def _prepare(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------- Wan


def _wan_i2v_pipeline(*, flf2v: bool):
    from diffusers import WanImageToVideoPipeline

    tokenizer = _umt5_tokenizer()
    # in = 16 noise + 4 temporal-mask + 16 condition latents.
    transformer = _wan_transformer(
        "wan21-flf2v-transformer" if flf2v else "wan21-i2v-transformer",
        in_channels=36,
        out_channels=16,
        with_image=True,
        flf2v=flf2v,
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan21_vae(),
        scheduler=_unipc_flow(WAN21_FLOW_SHIFT),
        image_processor=_clip_image_processor(),
        image_encoder=_wan_clip_vision(),
        transformer=transformer,
    )


def build_wan21_i2v(folder: Path) -> Path:
    """Wan2.1 I2V (480P/720P style): CLIP image tokens + 36-channel transformer input."""
    return _save(_wan_i2v_pipeline(flf2v=False), _prepare(folder))


def build_wan21_flf2v(folder: Path) -> Path:
    """Wan2.1 FLF2V: like I2V but the image embedder has pos_embed over first+last frame CLIP tokens."""
    return _save(_wan_i2v_pipeline(flf2v=True), _prepare(folder))


def build_wan22_a14b(folder: Path) -> Path:
    """Wan2.2 I2V-A14B: high-noise `transformer` + low-noise `transformer_2`, no CLIP image encoder."""
    from diffusers import WanImageToVideoPipeline

    tokenizer = _umt5_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan21_vae(),
        scheduler=_unipc_flow(WAN22_FLOW_SHIFT),
        image_processor=None,
        image_encoder=None,
        transformer=_wan_transformer("wan22-a14b-high", in_channels=36, out_channels=16, with_image=False),
        transformer_2=_wan_transformer("wan22-a14b-low", in_channels=36, out_channels=16, with_image=False),
        boundary_ratio=WAN22_BOUNDARY_RATIO,
    )
    return _save(pipe, _prepare(folder))


def build_wan22_ti2v_5b(folder: Path) -> Path:
    """Wan2.2 TI2V-5B as the hub folder writes it: ``WanPipeline`` with ``expand_timesteps: true`` (the same
    weights do text- and image-to-video; diffusers' WanImageToVideoPipeline runs the image path), 48-channel
    latents, 16x VAE, no CLIP; the image replaces the first latent frame."""
    from diffusers import WanPipeline

    tokenizer = _umt5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan22_vae(),
        scheduler=_unipc_flow(WAN22_FLOW_SHIFT),
        transformer=_wan_transformer("wan22-ti2v-transformer", in_channels=48, out_channels=48, with_image=False),
        expand_timesteps=True,
    )
    return _save(pipe, _prepare(folder))


def build_wan21_t2v(folder: Path) -> Path:
    """Wan2.1 T2V as the hub folder writes it (written by diffusers 0.33: no boundary_ratio, expand_timesteps or
    transformer_2 entries); the pack must refuse it as an I2V model."""
    from diffusers import WanPipeline

    tokenizer = _umt5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan21_vae(),
        scheduler=_unipc_flow(WAN21_FLOW_SHIFT),
        transformer=_wan_transformer("wan21-t2v-transformer", in_channels=16, out_channels=16, with_image=False),
    )
    _save(pipe, _prepare(folder))
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    for key in ("boundary_ratio", "expand_timesteps", "transformer_2"):
        index.pop(key, None)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return Path(folder)


def build_wan22_t2v_a14b(folder: Path) -> Path:
    """Wan2.2 T2V-A14B as the hub folder writes it: WanPipeline, two 16-channel experts, boundary_ratio 0.875,
    expand_timesteps false; the pack must refuse it as an I2V model."""
    from diffusers import WanPipeline

    tokenizer = _umt5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan21_vae(),
        scheduler=_unipc_flow(WAN22_FLOW_SHIFT),
        transformer=_wan_transformer("wan22-t2v-high", in_channels=16, out_channels=16, with_image=False),
        transformer_2=_wan_transformer("wan22-t2v-low", in_channels=16, out_channels=16, with_image=False),
        boundary_ratio=0.875,
    )
    return _save(pipe, _prepare(folder))


# ----------------------------------------------------------------------------- EasyAnimate

EA_LATENT = 16  # as the real V5.1 Magvit VAE
EA_TEXT_HIDDEN = 32
EA_TEXT_HEADS = 2
# Qwen2-VL's multimodal RoPE splits head_dim/2 frequencies over (t, h, w); the sections must sum to it.
EA_MROPE_SECTION = [2, 3, 3]


def _easyanimate_vae(tag: str):
    from diffusers import AutoencoderKLMagvit

    with _seeded(tag):
        vae = AutoencoderKLMagvit(
            latent_channels=EA_LATENT,
            block_out_channels=[8, 8, 8, 8],
            layers_per_block=1,
            norm_num_groups=2,
        ).eval()
    # The pipeline reads config.cache_mag_vae (V5.1 VAEs set it) but it is not an __init__ argument.
    vae.register_to_config(cache_mag_vae=True)
    return vae


def _easyanimate_transformer(tag: str, **extra):
    from diffusers import EasyAnimateTransformer3DModel

    kwargs = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        # in = latent + 1 mask channel (resize_inpaint_mask_directly) + masked-video latent.
        in_channels=2 * EA_LATENT + 1,
        out_channels=EA_LATENT,
        patch_size=2,
        num_layers=2,
        mmdit_layers=2,
        time_embed_dim=32,
        text_embed_dim=EA_TEXT_HIDDEN,
        resize_inpaint_mask_directly=True,
        enable_text_attention_mask=True,
        add_noise_in_inpaint_model=True,
    )
    kwargs.update(extra)
    with _seeded(tag):
        return EasyAnimateTransformer3DModel(**kwargs).eval()


def _qwen2vl_encoder(tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    if sum(EA_MROPE_SECTION) != EA_TEXT_HIDDEN // EA_TEXT_HEADS // 2:
        raise ValueError("mrope_section must sum to head_dim / 2")
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=EA_TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=EA_TEXT_HEADS,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": list(EA_MROPE_SECTION), "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=EA_TEXT_HIDDEN,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with _seeded("easyanimate-qwen2vl"):
        return Qwen2VLForConditionalGeneration(config).eval()


def build_easyanimate_v51_inp(folder: Path) -> Path:
    """EasyAnimate V5.1 InP: Magvit VAE (8x spatial, 4x temporal), Qwen2-VL text encoder, flow-matching Euler."""
    from diffusers import EasyAnimateInpaintPipeline, FlowMatchEulerDiscreteScheduler

    tokenizer = _qwen2_tokenizer()
    pipe = EasyAnimateInpaintPipeline(
        vae=_easyanimate_vae("easyanimate-vae"),
        text_encoder=_qwen2vl_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_easyanimate_transformer("easyanimate-v51-transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )
    return _save(pipe, _prepare(folder))


def build_easyanimate_v5_legacy_layout(folder: Path) -> Path:
    """EasyAnimate V5 (Bert + T5 text encoders) layout: model_index.json and component configs only, no weights.

    Diffusers' EasyAnimate pipelines cannot load this layout; the folder exists so the pack's
    loader can be tested to recognise and refuse it.
    """
    from diffusers import DDIMScheduler
    from transformers import BertConfig, T5Config

    import diffusers

    folder = _prepare(folder)
    bert_hidden, t5_hidden = 32, 48
    transformer = _easyanimate_transformer(
        "easyanimate-v5-transformer", text_embed_dim=bert_hidden, text_embed_dim_t5=t5_hidden
    )
    transformer.save_config(folder / "transformer")
    _easyanimate_vae("easyanimate-v5-vae").save_config(folder / "vae")
    DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    ).save_config(folder / "scheduler")
    BertConfig(
        architectures=["BertModel"],
        vocab_size=512,
        hidden_size=bert_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(folder / "text_encoder")
    T5Config(
        architectures=["T5EncoderModel"],
        vocab_size=512,
        d_model=t5_hidden,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        is_encoder_decoder=False,
    ).save_pretrained(folder / "text_encoder_2")
    for sub, cls in (("tokenizer", "BertTokenizer"), ("tokenizer_2", "T5Tokenizer")):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": cls, "model_max_length": 256}, indent=2) + "\n"
        )
    model_index = {
        "_class_name": "EasyAnimateInpaintPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "tokenizer_2": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "EasyAnimateTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLMagvit"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- I2VGen-XL

I2V_CROSS_DIM = 32  # CLIP text hidden = CLIP vision projection_dim = UNet cross_attention_dim


def build_i2vgenxl(folder: Path) -> Path:
    """I2VGen-XL: 3-D UNet over per-frame SD-style latents (4 ch, 8x), CLIP text + CLIP image embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = _clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=I2V_CROSS_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=I2V_CROSS_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH,
        projection_dim=I2V_CROSS_DIM,
    )
    with _seeded("i2vgenxl-clip-text"):
        text_encoder = CLIPTextModel(text_config).eval()
    with _seeded("i2vgenxl-clip-vision"):
        image_encoder = CLIPVisionModelWithProjection(vision_config).eval()
    with _seeded("i2vgenxl-vae"):
        # Four levels -> 8x spatial like the SD VAE; the UNet hard-codes 4 latent channels.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 16, 16],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
        ).eval()
    with _seeded("i2vgenxl-unet"):
        unet = I2VGenXLUNet(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=I2V_CROSS_DIM,
            attention_head_dim=4,
        ).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = I2VGenXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        feature_extractor=_clip_image_processor(),
        unet=unet,
        scheduler=scheduler,
    )
    return _save(pipe, _prepare(folder))


# ----------------------------------------------------------------------------- registry / CLI

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny-wan21-i2v": build_wan21_i2v,
    "tiny-wan21-flf2v": build_wan21_flf2v,
    "tiny-wan22-i2v-a14b": build_wan22_a14b,
    "tiny-wan22-ti2v-5b": build_wan22_ti2v_5b,
    "tiny-wan21-t2v": build_wan21_t2v,
    "tiny-wan22-t2v-a14b": build_wan22_t2v_a14b,
    "tiny-easyanimate-v51-inp": build_easyanimate_v51_inp,
    "tiny-easyanimate-v5-legacy": build_easyanimate_v5_legacy_layout,
    "tiny-i2vgenxl": build_i2vgenxl,
}


def source_stamp() -> str:
    """What a complete folder's stamp must contain: this script's hash plus the library versions that write it."""
    import diffusers
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return f"{digest} diffusers={diffusers.__version__} transformers={transformers.__version__}\n"


def _is_complete(folder: Path, stamp: str) -> bool:
    marker = folder / STAMP_FILE
    return marker.is_file() and marker.read_text() == stamp


def build_all(root: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Build every (or the `only` named) tiny model into root/<name>/, reusing folders whose stamp is current."""
    root = Path(root)
    names = list(BUILDERS) if not only else list(only)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise KeyError(f"unknown tiny model(s) {unknown}; known: {sorted(BUILDERS)}")
    root.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp()
    out: dict[str, Path] = {}
    for name in names:
        dest = root / name
        if not _is_complete(dest, stamp):
            # Build beside the destination and rename, so an interrupted or concurrent build
            # never leaves a half-written folder that looks complete.
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                BUILDERS[name](tmp)
                (tmp / STAMP_FILE).write_text(stamp)
                if _is_complete(dest, stamp):  # another process won the race
                    shutil.rmtree(tmp)
                else:
                    if dest.exists():
                        shutil.rmtree(dest)
                    os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        out[name] = dest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="output root; each model goes to ROOT/<name>/")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), metavar="NAME", help="build just these")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    # Keep stdout/stderr to the folder list: the libraries' warnings and save progress bars are noise here.
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    for path in build_all(args.root, args.only).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
