"""I2VGen-XL through the same loader, sampler and decoder as every family (tiny random model, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vramwise.decode import TilingMode, TilingOptions, decode_latents
from vramwise.errors import InputError
from vramwise.families import detect_family, family_by_id
from vramwise.families.base import GenerationRequest
from vramwise.families.i2vgenxl import I2VGenXL
from vramwise.handles import VramwiseModel
from vramwise.preview import latent_preview
from vramwise.sampling import generate
from vramwise.validation import validate_generation

from engine_helpers import Cancelled, Recorder, load_tiny, picture, tiny_request

MODEL = "tiny-i2vgenxl"
# ComfyUI's SD15 latent_rgb_factors (4 channels x RGB), the format the family names for previews.
SD15_FACTORS = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


def request(**overrides) -> GenerationRequest:
    return tiny_request("a dog runs on the beach", **{"seed": 11, "num_frames": 3, **overrides})


def load(root: Path, mode: str = "none", dtype: str = "bf16", text_on_cpu: bool = False) -> VramwiseModel:
    return load_tiny(root / MODEL, mode, dtype, text_on_cpu)


@pytest.fixture(scope="module")
def model(tiny_models_root: Path) -> VramwiseModel:
    return load(tiny_models_root)


@pytest.fixture(scope="module")
def reference(model: VramwiseModel) -> torch.Tensor:
    return generate(model, request()).samples


def test_detects_i2vgenxl(tiny_models_root: Path) -> None:
    family = detect_family(tiny_models_root / MODEL)
    assert isinstance(family, I2VGenXL)
    assert family_by_id("i2vgenxl").label == family.label
    assert family.denoiser_names == ("unet",) and not family.supports_end_image


def test_input_rules() -> None:
    family = I2VGenXL()
    d = family.defaults
    assert (d.width, d.height, d.num_frames, d.steps, d.cfg, d.fps) == (1280, 704, 16, 50, 9.0, 16)
    # No temporal compression: every frame count is valid, the default 16 included.
    for n in (1, 2, 16, 17):
        validate_generation(family, width=72, height=64, num_frames=n, steps=2, cfg=9.0)
    with pytest.raises(InputError) as err:
        validate_generation(family, width=1280, height=700, num_frames=16, steps=50, cfg=9.0)
    assert err.value.input_name == "height" and "696 or 704" in str(err.value)
    with pytest.raises(InputError) as err:
        validate_generation(family, width=64, height=64, num_frames=16, steps=2, cfg=9.0, has_end_image=True)
    assert err.value.input_name == "end_image"
    with pytest.raises(InputError) as err:
        validate_generation(family, width=64, height=64, num_frames=129, steps=2, cfg=9.0)
    assert err.value.input_name == "num_frames"


def test_generates_requested_frames_and_size(model: VramwiseModel) -> None:
    # 72 px: a multiple of 8 that the tiny UNet's 2x down-sampling does not divide (latent 9).
    req = request(width=72, height=64, num_frames=2, image=picture(72, 64, 5))
    latent = generate(model, req)
    assert latent.samples.shape == (1, 4, 2, 8, 9)
    assert latent.family_id == "i2vgenxl" and latent.fps == 16
    frames, note = decode_latents(model, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (2, 64, 72, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and "untiled" in note

    tiled, note = decode_latents(model, latent, TilingOptions(TilingMode.ON, tile=64, overlap=16))
    assert tiled.shape == frames.shape and "tiled" in note
    assert model.loaded.pipe.vae.use_tiling and model.loaded.pipe.vae.tile_latent_min_size == 8
    # Off-grid tile sizes are rounded to the 8 px grid; AutoencoderKL would otherwise return the wrong size.
    odd, _ = decode_latents(model, latent, TilingOptions(TilingMode.ON, tile=68, overlap=20))
    assert odd.shape == frames.shape
    # Sampling after a tiled decode encodes the start image untiled: same seed, same latents.
    assert torch.equal(generate(model, req).samples, latent.samples)
    assert model.loaded.pipe.vae.use_tiling


def test_single_frame(model: VramwiseModel) -> None:
    latent = generate(model, request(num_frames=1, steps=1))
    frames, _ = decode_latents(model, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (1, 64, 64, 3)


def test_seeds_are_reproducible(model: VramwiseModel, reference: torch.Tensor) -> None:
    """The pipeline samples the image latents from the global RNG; sampling.generate seeds it too."""
    torch.manual_seed(999)  # whatever the global RNG state was, the seed decides
    assert torch.equal(generate(model, request()).samples, reference)
    assert not torch.allclose(generate(model, request(seed=12)).samples, reference)


def test_progress_per_step_and_cancel(model: VramwiseModel, reference: torch.Tensor) -> None:
    """No step callback in this pipeline: progress comes from the scheduler.step wrapper, Cancel from the UNet hook."""
    observer = Recorder()
    generate(model, request(steps=3), observer)
    assert observer.steps == [(1, 3), (2, 3), (3, 3)]
    assert observer.checks >= 4
    # The scheduler sees frames folded into the batch; the preview still gets a 4-channel picture out of it.
    assert observer.shapes[0][1] == 4
    fake = torch.randn(1, 4, 3, 8, 8)
    assert latent_preview(fake, SD15_FACTORS, None, 64) is not None
    assert I2VGenXL.preview_latent_format == "SD15"

    cancelling = Recorder(cancel_at=2)
    with pytest.raises(Cancelled, match="step 2"):
        generate(model, request(steps=3), cancelling)
    assert cancelling.steps == [(1, 3), (2, 3)]
    assert torch.equal(generate(model, request()).samples, reference)


def test_prompt_embeddings_are_penultimate_layer_normed(model: VramwiseModel) -> None:
    """What the pipeline's clip_skip=1 meant, computed without the .text_model attribute transformers dropped."""
    pipe = model.loaded.pipe
    family = model.family
    ours = family._encode(model.loaded, ["a dog runs"])
    ids = pipe.tokenizer(["a dog runs"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(hidden[-2])
        last = pipe.text_encoder(ids).last_hidden_state
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, last)


@pytest.mark.parametrize(
    "mode,text_on_cpu",
    [("model", False), ("group", False), ("sequential", False), ("group", True)],
    ids=["model", "group", "sequential", "group+text_encoder_on_cpu"],
)
def test_offload_modes_match_resident(tiny_models_root: Path, reference: torch.Tensor, mode: str, text_on_cpu: bool) -> None:
    m = load(tiny_models_root, mode, text_on_cpu=text_on_cpu)
    latent = generate(m, request())
    assert torch.allclose(latent.samples, reference, atol=1e-3)
    frames, _ = decode_latents(m, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (3, 64, 64, 3)


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp16"])
def test_weight_dtypes(tiny_models_root: Path, reference: torch.Tensor, dtype: str) -> None:
    m = load(tiny_models_root, "model", dtype)
    unet = m.loaded.pipe.unet
    if dtype == "fp8_e4m3fn":
        assert any("fp8 storage" in n for n in m.loaded.notes)
        assert unet.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float8_e4m3fn
        # Family-specific layers kept in compute precision.
        assert unet.fps_embedding[0].weight.dtype == torch.bfloat16
        assert unet.context_embedding[0].weight.dtype == torch.bfloat16
        assert unet.image_latents_proj_in[0].weight.dtype == torch.bfloat16
    else:
        assert unet.dtype == torch.float16 and m.loaded.pipe.text_encoder.dtype == torch.float16
    latent = generate(m, request())
    assert latent.samples.shape == reference.shape and torch.isfinite(latent.samples).all()
    frames, _ = decode_latents(m, latent, TilingOptions(TilingMode.ON, tile=64, overlap=16))
    assert frames.shape == (3, 64, 64, 3)


def test_stream_offload_is_refused_naming_the_input(tiny_models_root: Path) -> None:
    with pytest.raises(InputError) as err:
        load(tiny_models_root, "stream")
    assert err.value.input_name == "offload_mode"
    assert "I2VGen-XL" in str(err.value) and "model" in err.value.fix and "stream" not in err.value.fix


def test_auto_offload_skips_stream_plans_for_a_unet(tiny_models_root: Path, reference: torch.Tensor) -> None:
    m = load(tiny_models_root, "auto")
    plan = m.loaded.placement.plan.plan
    assert plan.offload != "stream"
    out = generate(m, request()).samples
    # On a CPU auto takes its first offloading plan: for a UNet that is sequential with fp8 storage, whose
    # 3-bit mantissa moves each weight by up to ~6%; the latents stay within a few percent of bf16.
    rel = (out - reference).norm() / reference.norm()
    assert torch.isfinite(out).all() and float(rel) < (0.1 if plan.fp8 else 1e-3)
