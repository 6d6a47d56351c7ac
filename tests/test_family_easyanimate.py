"""EasyAnimate V5.1 InP through the same loader, sampler and decoder as every family (tiny random model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vramwise.decode import TilingMode, TilingOptions, decode_latents
from vramwise.errors import InputError, ModelFolderError
from vramwise.families import FAMILY_CLASSES, detect_family, family_by_id
from vramwise.families.base import GenerationRequest
from vramwise.families.easyanimate import EasyAnimateV51InP, inpaint_video
from vramwise.handles import VramwiseModel
from vramwise.loader import LoadOptions, load_pipeline
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.sampling import generate
from vramwise.validation import validate_generation

from engine_helpers import Cancelled, Recorder, load_tiny, picture, tiny_request

MODEL = "tiny-easyanimate-v51-inp"
LEGACY = "tiny-easyanimate-v5-legacy"
CPU = torch.device("cpu")


def request(**overrides) -> GenerationRequest:
    return tiny_request("a cat walks on the grass", **{"seed": 7, "num_frames": 5, **overrides})


def load(root: Path, mode: str = "none", dtype: str = "bf16", text_on_cpu: bool = False) -> VramwiseModel:
    return load_tiny(root / MODEL, mode, dtype, text_on_cpu)


@pytest.fixture(scope="module")
def model(tiny_models_root: Path) -> VramwiseModel:
    return load(tiny_models_root)


@pytest.fixture(scope="module")
def reference(model: VramwiseModel) -> torch.Tensor:
    """Latents of the default request on the resident bf16 model: what every other mode must reproduce."""
    return generate(model, request()).samples


# ----------------------------------------------------------------------------- detection


def test_detects_v51_inp(tiny_models_root: Path) -> None:
    family = detect_family(tiny_models_root / MODEL)
    assert isinstance(family, EasyAnimateV51InP)
    assert family_by_id(family.id).id == family.id
    assert family.supports_end_image
    # Registered once, ahead of nothing it could shadow: Wan folders still go to Wan families.
    assert sum(c is EasyAnimateV51InP for c in FAMILY_CLASSES) == 1
    assert detect_family(tiny_models_root / "tiny-wan21-i2v").id.startswith("wan")


def test_refuses_legacy_bert_t5_layout(tiny_models_root: Path) -> None:
    with pytest.raises(ModelFolderError) as err:
        detect_family(tiny_models_root / LEGACY)
    message = str(err.value)
    assert LEGACY in message
    assert "Bert + T5" in message and "BertModel" in message and "T5EncoderModel" in message
    assert "V5.1 InP" in message and "Qwen2-VL" in message


def test_refuses_text_to_video_folder(tiny_models_root: Path, tmp_path: Path) -> None:
    """An EasyAnimate T2V folder (transformer in = latent channels) is named as such, not silently run."""
    src = tiny_models_root / MODEL
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "EasyAnimatePipeline"
    (tmp_path / "t2v").mkdir()
    (tmp_path / "t2v" / "model_index.json").write_text(json.dumps(index))
    for sub in ("transformer", "vae"):
        (tmp_path / "t2v" / sub).mkdir()
        config = json.loads((src / sub / "config.json").read_text())
        if sub == "transformer":
            config["in_channels"] = 16
        (tmp_path / "t2v" / sub / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="text-to-video"):
        detect_family(tmp_path / "t2v")


# ----------------------------------------------------------------------------- input rules


def test_input_rules() -> None:
    family = EasyAnimateV51InP()
    d = family.defaults
    assert (d.width, d.height, d.num_frames, d.steps, d.cfg, d.fps) == (672, 384, 49, 50, 6.0, 8)
    validate_generation(family, width=672, height=384, num_frames=49, steps=50, cfg=6.0, has_end_image=True)
    with pytest.raises(InputError) as err:
        validate_generation(family, width=100, height=384, num_frames=49, steps=50, cfg=6.0)
    assert err.value.input_name == "width" and "96 or 112" in str(err.value)
    with pytest.raises(InputError) as err:
        validate_generation(family, width=672, height=384, num_frames=48, steps=50, cfg=6.0)
    assert err.value.input_name == "num_frames" and "45 or 49" in str(err.value)


def test_inpaint_video_marks_given_frames() -> None:
    start, end = picture(32, 16, 1), picture(32, 16, 2)
    video, mask = inpaint_video(start, end, 9, 16, 32)
    assert video.shape == (1, 3, 9, 16, 32) and mask.shape == (1, 1, 9, 16, 32)
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    assert torch.equal(mask[0, 0, :, 0, 0], torch.tensor([0.0] + [255.0] * 7 + [0.0]))
    assert torch.allclose(video[0, :, -1].permute(1, 2, 0), torch.from_numpy(np.asarray(end) / 255.0).float())
    _, mask = inpaint_video(start, None, 5, 16, 32)
    assert torch.equal(mask[0, 0, :, 0, 0], torch.tensor([0.0, 255.0, 255.0, 255.0, 255.0]))


# ----------------------------------------------------------------------------- generate + decode


def test_generates_requested_frames_and_size(model: VramwiseModel) -> None:
    # 80 px wide: larger than a 64 px tile, so tiled decode (and, if it were used, tiled encode) really tiles.
    req = request(width=80, height=64, num_frames=5, image=picture(80, 64, 3), end_image=picture(80, 64, 4))
    latent = generate(model, req)
    assert latent.samples.shape == (1, 16, 2, 8, 10)
    assert latent.family_id == "easyanimate-v5.1-inp" and latent.fps == 8
    frames, note = decode_latents(model, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (5, 64, 80, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    assert "untiled" in note

    tiled, note = decode_latents(model, latent, TilingOptions(TilingMode.ON, tile=64, overlap=16))
    assert tiled.shape == frames.shape and "tiled 64px" in note
    assert model.loaded.pipe.vae.use_tiling
    # Tile sizes off the 8-pixel grid are rounded onto it rather than giving a misaligned result.
    odd, _ = decode_latents(model, latent, TilingOptions(TilingMode.ON, tile=70, overlap=30))
    assert odd.shape == frames.shape
    assert not model.loaded.pipe.vae.use_slicing

    # Sampling again after a tiled decode must not use Magvit's tiled encode (it misplaces tiles): same seed,
    # same latents as before.
    again = generate(model, req)
    assert torch.equal(again.samples, latent.samples)
    assert model.loaded.pipe.vae.use_tiling, "the decoder's tiling setting is restored after sampling"


def test_single_frame(model: VramwiseModel) -> None:
    latent = generate(model, request(num_frames=1, steps=1))
    frames, _ = decode_latents(model, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (1, 64, 64, 3)


def test_seeds_are_reproducible(model: VramwiseModel, reference: torch.Tensor) -> None:
    assert torch.equal(generate(model, request()).samples, reference)
    assert not torch.allclose(generate(model, request(seed=8)).samples, reference)


def test_progress_per_step_and_cancel(model: VramwiseModel, reference: torch.Tensor) -> None:
    observer = Recorder()
    generate(model, request(steps=3), observer)
    assert observer.steps == [(1, 3), (2, 3), (3, 3)]
    # Cancel is checked before every transformer call (and once before the run starts).
    assert observer.checks >= 4

    cancelling = Recorder(cancel_at=2)
    with pytest.raises(Cancelled, match="step 2"):
        generate(model, request(steps=3), cancelling)
    assert cancelling.steps == [(1, 3), (2, 3)]
    # The pipeline is left as it was: the next run completes and matches the reference exactly.
    assert torch.equal(generate(model, request()).samples, reference)


# ----------------------------------------------------------------------------- offload modes and dtypes


@pytest.mark.parametrize(
    "mode,text_on_cpu",
    [("model", False), ("group", False), ("sequential", False), ("stream", False), ("model", True)],
    ids=["model", "group", "sequential", "stream", "model+text_encoder_on_cpu"],
)
def test_offload_modes_match_resident(tiny_models_root: Path, reference: torch.Tensor, mode: str, text_on_cpu: bool) -> None:
    m = load(tiny_models_root, mode, text_on_cpu=text_on_cpu)
    latent = generate(m, request())
    assert torch.allclose(latent.samples, reference, atol=1e-3)
    frames, _ = decode_latents(m, latent, TilingOptions(TilingMode.OFF))
    assert frames.shape == (5, 64, 64, 3)


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp16"])
def test_weight_dtypes(tiny_models_root: Path, reference: torch.Tensor, dtype: str) -> None:
    m = load(tiny_models_root, "model", dtype)
    pipe = m.loaded.pipe
    if dtype == "fp8_e4m3fn":
        assert any("fp8 storage" in n for n in m.loaded.notes)
        assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
        # Family-specific layers kept in compute precision: patch embedding and text projection.
        assert pipe.transformer.proj.weight.dtype == torch.bfloat16
        assert pipe.transformer.text_proj.weight.dtype == torch.bfloat16
    else:
        assert pipe.transformer.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    latent = generate(m, request())
    assert latent.samples.shape == reference.shape and torch.isfinite(latent.samples).all()
    frames, _ = decode_latents(m, latent, TilingOptions(TilingMode.ON, tile=64, overlap=16))
    assert frames.shape == (5, 64, 64, 3)


def test_vision_tower_dropped_and_cache_flag(model: VramwiseModel) -> None:
    pipe = model.loaded.pipe
    assert pipe.text_encoder.model.visual is None
    assert pipe.vae.config.cache_mag_vae is True


def test_vae_config_without_cache_flag(tiny_models_root: Path, tmp_path: Path) -> None:
    """A V5.1 folder whose vae/config.json lacks cache_mag_vae (not an __init__ argument) still runs."""
    src = tiny_models_root / MODEL
    dst = tmp_path / "no-cache-flag"
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "vae":
            (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (dst / "vae").mkdir()
    for item in (src / "vae").iterdir():
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config.pop("cache_mag_vae")
            (dst / "vae" / "config.json").write_text(json.dumps(config))
        else:
            (dst / "vae" / item.name).symlink_to(item)
    options = LoadOptions(dst, OffloadMode.NONE, WeightDtype.BF16)
    m = VramwiseModel(load_pipeline(options, CPU))
    assert m.loaded.pipe.vae.config.cache_mag_vae is True
    assert generate(m, request(steps=1)).samples.shape == (1, 16, 2, 8, 8)


def test_auto_offload(tiny_models_root: Path, reference: torch.Tensor) -> None:
    m = load(tiny_models_root, "auto")
    assert torch.allclose(generate(m, request()).samples, reference, atol=1e-3)
