"""EasyAnimate V5.1 InP: image-to-video as video inpainting (start frame, optional end frame).

The InP transformer sees the noisy latents next to a mask channel and the VAE latents of a "masked video":
the frames to keep are real pixels, every frame to generate is -1 (black in -1..1). I2V is therefore a video
of ``num_frames`` frames with the start image in frame 0 (and the end image in the last frame) plus a mask
that is 0 on kept frames and 255 on generated ones.

Published settings (EasyAnimate repo, V5.1 predict scripts and model card): 384x672 (height x width), 49 frames
at 8 fps, 50 steps, cfg 6.0, flow-matching Euler sampler. The model card says "1 to 49 frames" and
"multiple resolutions (512, 768, 1024)"; longer clips are allowed here but are outside what it was trained on.
Unverified: the flow shift of the published scheduler config (we default to 1.0, FlowMatchEulerDiscreteScheduler's
own default, and the scheduler config in the folder is what runs unless the sampler's shift differs).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ..prompt_cache import encode_prompts
from .base import Family, FamilyDefaults, GenerationRequest, ModelIndex

if TYPE_CHECKING:
    from ..handles import LoadedPipeline

PIPELINE = "EasyAnimateInpaintPipeline"
# Folders of these classes may hold the same components; the InP transformer is what makes a folder usable.
_EASYANIMATE_PIPELINES = ("EasyAnimateInpaintPipeline", "EasyAnimatePipeline", "EasyAnimateControlPipeline")
_V51_TEXT_ENCODER = "Qwen2VLForConditionalGeneration"
# Prompts are padded to 256 tokens, the pipeline's own encode_prompt default.
MAX_TEXT_TOKENS = 256
# Qwen2-VL's own chat template puts a default system turn before the user turn. Folders whose tokenizer has no
# template (some conversions drop chat_template.json) would make apply_chat_template raise; this renders the
# same text for a text-only message.
_QWEN2VL_FRAMING = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
)
# Decode peak of the full-size Magvit decoder (diffusers' default AutoencoderKLMagvit config: block_out_channels
# [128, 256, 512, 512], 2 layers per block) per output pixel of one frame, bf16, untiled, measured on an H200:
# 5.35 GiB for 672x384x49 and 21.2 GiB for 1344x768x17, i.e. ~22,300 bytes per pixel either way. It decodes one
# latent frame (4 video frames) at a time with a causal cache, so the peak scales with pixels per frame, not with
# clip length. Tiled with 256 px tiles the same decodes peaked at 1.40 and 1.46 GiB.
_DECODE_BYTES_PER_PIXEL_FULL = 22_300.0
_FULL_FIRST_CHANNELS = 128


def legacy_layout_reason(index: ModelIndex) -> str | None:
    """Why an EasyAnimate folder in the V5 (Bert + T5) layout cannot run, or None for any other folder."""
    if index.pipeline_class not in _EASYANIMATE_PIPELINES:
        return None
    text_encoder = index.component_class("text_encoder")
    legacy = (
        index.has_component("text_encoder_2")
        or index.has_component("tokenizer_2")
        or text_encoder in ("BertModel", "T5EncoderModel")
    )
    if not legacy:
        return None
    parts = [f"text_encoder {text_encoder or 'missing'}"]
    if index.has_component("text_encoder_2"):
        parts.append(f"text_encoder_2 {index.component_class('text_encoder_2')}")
    return (
        f"an EasyAnimate V5 (or older) folder in the Bert + T5 layout ({', '.join(parts)}), which diffusers' "
        f"{PIPELINE} cannot load. Supported: the EasyAnimate V5.1 InP diffusers layout (one Qwen2-VL text encoder, "
        "e.g. 'alibaba-pai/EasyAnimateV5.1-7b-zh-InP-diffusers' or '...-12b-zh-InP-diffusers')"
    )


@contextmanager
def untiled_encode(vae: Any) -> Iterator[None]:
    """Switch VAE tiling off while sampling encodes the conditioning, then restore it.

    Tiling is state on the shared VAE, left on by a tiled decode. Magvit's tiled *encode* (diffusers 0.42.1) puts
    every tile into the result uncropped, so conditioning latents come out shifted by the tile overlap whenever
    the frame is larger than a tile. Untiled encoding also makes a seed's result independent of how the previous
    clip was decoded.
    """
    was = bool(getattr(vae, "use_tiling", False))
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = was


def inpaint_video(
    start: Any, end: Any | None, num_frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (video, mask_video) pair the InP pipeline takes for first(-last)-frame image-to-video.

    video: [1, 3, F, H, W] float 0..1, every frame the start image except the last one when an end image is given.
    mask: [1, 1, F, H, W] float, 0 where a frame is given, 255 where it is to be generated.
    Images must already be width x height (the sampler fits them); they are converted, not resized.
    """

    def as_tensor(img: Any) -> torch.Tensor:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        if array.shape[:2] != (height, width):
            raise ValueError(f"image is {array.shape[1]}x{array.shape[0]}, expected {width}x{height}")
        return torch.from_numpy(array).permute(2, 0, 1)

    first = as_tensor(start)
    video = first[None, :, None].repeat(1, 1, num_frames, 1, 1).contiguous()
    mask = torch.full((1, 1, num_frames, height, width), 255.0)
    mask[:, :, 0] = 0.0
    if end is not None:
        video[:, :, -1] = as_tensor(end)
        mask[:, :, -1] = 0.0
    return video, mask


class EasyAnimateV51InP(Family):
    id = "easyanimate-v5.1-inp"
    label = "EasyAnimate V5.1 InP (7B/12B)"
    pipeline_class_name = PIPELINE
    defaults = FamilyDefaults(width=672, height=384, num_frames=49, steps=50, cfg=6.0, shift=1.0, fps=8)
    # The pipeline floors height/width to multiples of 16 without telling anyone; we reject them instead.
    size_multiple = 16
    # Magvit: temporal_compression_ratio = 2 ** (len(block_out_channels) - 2) = 4, first frame kept on its own.
    temporal_factor = 4
    supports_end_image = True
    denoiser_names = ("transformer",)
    text_encoder_names = ("text_encoder",)
    # No ComfyUI latent format matches the 16-channel Magvit latents (HunyuanVideo/Wan21 factors are for other VAEs).
    preview_latent_format = None
    # Kept in bf16 under fp8 storage besides the generic patterns: the patch embedding (top-level `proj`) and the
    # projection of the Qwen2-VL hidden states (`text_proj`).
    fp8_skip_patterns = (r"^proj$", r"^text_proj")

    @classmethod
    def matches(cls, index: ModelIndex) -> bool:
        if index.pipeline_class not in _EASYANIMATE_PIPELINES or legacy_layout_reason(index) is not None:
            return False
        if index.component_class("text_encoder") != _V51_TEXT_ENCODER:
            return False
        if index.pipeline_class == PIPELINE:
            return True
        # A folder saved under another EasyAnimate class still runs as InP if its transformer is the InP one.
        in_channels = index.component_config("transformer").get("in_channels")
        latent = index.component_config("vae").get("latent_channels", 16)
        return index.pipeline_class == "EasyAnimatePipeline" and bool(in_channels) and in_channels > latent

    def load(self, folder: Path, torch_dtype: torch.dtype) -> Any:
        from diffusers import EasyAnimateInpaintPipeline

        pipe = EasyAnimateInpaintPipeline.from_pretrained(folder, dtype=torch_dtype)
        # The pipeline reads vae.config.cache_mag_vae (True for the V5.1 Magvit VAE, from the upstream yaml) but
        # it is not an __init__ argument, so a vae/config.json without it makes the first run AttributeError.
        if "cache_mag_vae" not in pipe.vae.config:
            pipe.vae.register_to_config(cache_mag_vae=True)
        # Slicing the Magvit VAE breaks for batch > 1 (its causal-conv cache is not cleared between slices);
        # we decode batch 1, but make sure nothing left it on.
        pipe.vae.disable_slicing()
        # Prompts are text only: Qwen2-VL's vision tower (~0.7B parameters in the 7B text encoder) is never run.
        # Dropping it keeps it out of VRAM under every offload mode (the upstream scripts delete it too).
        inner = getattr(pipe.text_encoder, "model", None)
        if inner is not None and getattr(inner, "visual", None) is not None:
            inner.visual = None
        # ComfyUI shows its own per-step progress; the pipeline's tqdm bar would only clutter the console.
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latent_factors(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_spatial_compression_ratio), int(pipe.vae_temporal_compression_ratio)

    def configure_scheduler(self, pipe: Any, request: GenerationRequest) -> None:
        super().configure_scheduler(pipe, request)  # refuses the Wan-only scheduler choices
        config = pipe.scheduler.config
        # With dynamic shifting the pipeline's mu=1 decides the schedule and a shift would be ignored.
        if "shift" in config and not config.get("use_dynamic_shifting", False):
            if float(config["shift"]) != float(request.shift):
                pipe.scheduler = type(pipe.scheduler).from_config(config, shift=float(request.shift))

    def _encode(self, loaded: "LoadedPipeline", texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL hidden states (second to last layer) and attention mask, computed on the text device.

        Done here rather than by pipe.encode_prompt, which moves the tokens to ``text_encoder.device``: under
        sequential offload that is the meta device and the run fails.
        """
        pipe = loaded.pipe
        tokenizer = pipe.tokenizer
        if getattr(tokenizer, "chat_template", None):
            rendered = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "text", "text": t}]}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for t in texts
            ]
        else:
            rendered = [_QWEN2VL_FRAMING.format(text=t) for t in texts]
        tokens = tokenizer(
            text=rendered,
            padding="max_length",
            max_length=MAX_TEXT_TOKENS,
            truncation=True,
            return_attention_mask=True,
            padding_side="right",
            return_tensors="pt",
        )
        device = loaded.text_device
        ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2], mask

    def _generator(self, loaded: "LoadedPipeline", request: GenerationRequest, generator: torch.Generator) -> torch.Generator:
        """The generator to hand the pipeline.

        The pipeline draws the conditioning-video noise with ``torch.randn(..., generator=g, device=video.device)``,
        which refuses a CPU generator for a CUDA tensor. On an accelerator we therefore pass a generator on that
        device, seeded with the request's seed: same seed, same video on the same kind of device (the noise
        differs between CPU and GPU for this family).
        """
        device = loaded.device
        if device.type == "cpu":
            return generator
        return torch.Generator(device).manual_seed(request.seed)

    def sample(self, loaded: "LoadedPipeline", request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        pipe = loaded.pipe
        do_cfg = request.cfg > 1.0
        with torch.no_grad():
            texts = [request.prompt] + ([request.negative_prompt] if do_cfg else [])
            # One batch for both prompts: they are padded to the same length anyway.
            embeds, masks = encode_prompts(loaded, request.prompt, request.negative_prompt, do_cfg, MAX_TEXT_TOKENS,
                                           lambda: self._encode(loaded, texts))  # cached: prompt_cache.py
        device = loaded.device
        embeds, masks = embeds.to(device), masks.to(device)
        video, mask = inpaint_video(request.image, request.end_image, request.num_frames, request.height, request.width)
        kwargs: dict[str, Any] = dict(
            prompt=None,
            prompt_embeds=embeds[:1],
            prompt_attention_mask=masks[:1],
            video=video,
            mask_video=mask,
            num_frames=request.num_frames,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            generator=self._generator(loaded, request, generator),
            output_type="latent",
        )
        if do_cfg:
            kwargs["negative_prompt_embeds"] = embeds[1:]
            kwargs["negative_prompt_attention_mask"] = masks[1:]
        with untiled_encode(pipe.vae):
            return pipe(**kwargs).frames

    def vae_tiling(self, loaded: "LoadedPipeline", enabled: bool, tile: int, overlap: int) -> None:
        """Magvit tiles in pixels like Wan, but its tiled decode only lines up when tile and stride are multiples
        of the 8x spatial factor (it floors them to latent pixels, then blends and crops in video pixels)."""
        vae = loaded.pipe.vae
        if not enabled:
            vae.disable_tiling()
            return
        f = int(vae.spatial_compression_ratio)
        tile_px = max(2 * f, (tile // f) * f)
        stride_px = max(f, ((tile - overlap) // f) * f)
        stride_px = min(stride_px, tile_px)
        # enable_tiling treats 0/None as "keep the old value", so every size is passed explicitly.
        vae.enable_tiling(
            tile_sample_min_height=tile_px,
            tile_sample_min_width=tile_px,
            tile_sample_stride_height=stride_px,
            tile_sample_stride_width=stride_px,
        )

    def decode(self, loaded: "LoadedPipeline", latents: torch.Tensor) -> torch.Tensor:
        vae = loaded.pipe.vae
        latents = latents.to(loaded.device, vae.dtype) / float(vae.config.scaling_factor)
        with torch.no_grad():
            video = vae.decode(latents, return_dict=False)[0]
        # [1, 3, F, H, W] in -1..1 -> [F, H, W, 3] in 0..1
        frames = ((video[0].float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 3, 0)
        return frames.contiguous().cpu()

    def decode_bytes_per_pixel(self, loaded: "LoadedPipeline") -> float:
        vae = loaded.pipe.vae
        channels = float((vae.config.get("block_out_channels") or [_FULL_FIRST_CHANNELS])[0])
        elem = torch.tensor([], dtype=vae.dtype).element_size()
        return _DECODE_BYTES_PER_PIXEL_FULL * (channels / _FULL_FIRST_CHANNELS) * (elem / 2.0)


EASYANIMATE_FAMILIES: tuple[type[Family], ...] = (EasyAnimateV51InP,)
