"""The tiny models from scripts/tiny_models.py load through diffusers' own from_pretrained and denoise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_models  # noqa: E402

PROMPT = "a cat walking on the beach, slow camera pan"
FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_safetensors_only(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files), "no safetensors weights were written"
    pickles = [p for p in files if p.suffix in FORBIDDEN_SUFFIXES]
    assert not pickles, f"pickle-format files present: {pickles}"


def _assert_video_latents(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all()


def _assert_frames(frames, n: int, size: int) -> None:
    arr = np.asarray(frames)
    assert arr.shape == (1, n, size, size, 3)
    assert np.isfinite(arr).all()


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.token_counts: list[int] = []

    def __call__(self, module, args, kwargs=None) -> None:
        self.calls += 1
        if args:
            self.token_counts.append(args[0].shape[1])


def _load(pipeline_cls, folder: Path):
    pipe = pipeline_cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- Wan


@pytest.mark.parametrize(
    ("builder", "image_tokens"),
    [
        pytest.param(tiny_models.build_wan21_i2v, 17, id="wan21-i2v"),
        # FLF2V: CLIP tokens of the first and the last frame, joined by the pos-embedded image embedder.
        pytest.param(tiny_models.build_wan21_flf2v, 34, id="wan21-flf2v"),
    ],
)
def test_wan21_image_to_video(tmp_path: Path, builder, image_tokens: int) -> None:
    from diffusers import WanImageToVideoPipeline

    folder = builder(tmp_path / "model")
    _assert_safetensors_only(folder)
    pipe = _load(WanImageToVideoPipeline, folder)
    assert pipe.image_encoder is not None and pipe.transformer_2 is None
    # The image branch must actually receive CLIP tokens (it silently gets 0 if misconfigured).
    counter = _CallCounter()
    pipe.transformer.blocks[0].attn2.add_k_proj.register_forward_pre_hook(counter)
    extra = {"last_image": _image(seed=1)} if image_tokens == 34 else {}
    out = pipe(
        image=_image(),
        prompt=PROMPT,
        negative_prompt="",
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).frames
    _assert_video_latents(out, (1, 16, 2, 8, 8))
    assert counter.calls == 4  # 2 steps x (cond + uncond)
    assert set(counter.token_counts) == {image_tokens}

    frames = pipe(
        image=_image(32, 32),
        prompt=PROMPT,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=1,
        output_type="np",
        **({"last_image": _image(32, 32, 1)} if extra else {}),
    ).frames
    _assert_frames(frames, 5, 32)


def test_wan22_a14b_uses_both_experts(tmp_path: Path) -> None:
    from diffusers import WanImageToVideoPipeline

    folder = tiny_models.build_wan22_a14b(tmp_path / "model")
    _assert_safetensors_only(folder)
    pipe = _load(WanImageToVideoPipeline, folder)
    assert pipe.image_encoder is None and pipe.config.boundary_ratio == pytest.approx(0.9)
    high, low = _CallCounter(), _CallCounter()
    pipe.transformer.register_forward_pre_hook(high)
    pipe.transformer_2.register_forward_pre_hook(low)
    out = pipe(
        image=_image(),
        prompt=PROMPT,
        negative_prompt="",
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    _assert_video_latents(out, (1, 16, 2, 8, 8))
    # Timesteps 999 and 833 straddle the 900 boundary: one step per expert.
    assert (high.calls, low.calls) == (2, 2)


def test_wan22_ti2v_5b(tmp_path: Path) -> None:
    from diffusers import WanImageToVideoPipeline

    folder = tiny_models.build_wan22_ti2v_5b(tmp_path / "model")
    _assert_safetensors_only(folder)
    # As the hub's Wan2.2-TI2V-5B-Diffusers: the text-to-video pipeline's name, image path by expand_timesteps.
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    pipe = _load(WanImageToVideoPipeline, folder)
    assert pipe.config.expand_timesteps and pipe.vae_scale_factor_spatial == 16
    out = pipe(
        image=_image(),
        prompt=PROMPT,
        negative_prompt="",
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    _assert_video_latents(out, (1, 48, 2, 4, 4))
    frames = pipe(
        image=_image(32, 32), prompt=PROMPT, height=32, width=32, num_frames=5, num_inference_steps=1, output_type="np"
    ).frames
    _assert_frames(frames, 5, 32)


def test_wan21_t2v_is_a_text_to_video_folder(tmp_path: Path) -> None:
    from diffusers import WanPipeline

    folder = tiny_models.build_wan21_t2v(tmp_path / "model")
    _assert_safetensors_only(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert "image_encoder" not in index
    pipe = _load(WanPipeline, folder)
    assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.image_dim is None
    assert "expand_timesteps" not in index and "transformer_2" not in index  # diffusers 0.33 wrote neither


def test_wan22_t2v_a14b_is_a_two_expert_text_to_video_folder(tmp_path: Path) -> None:
    from diffusers import WanPipeline

    folder = tiny_models.build_wan22_t2v_a14b(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    assert index["expand_timesteps"] is False
    pipe = _load(WanPipeline, folder)
    assert pipe.transformer_2 is not None and pipe.transformer.config.in_channels == 16


# --------------------------------------------------------------------------- EasyAnimate


def test_easyanimate_v51_inp(tmp_path: Path) -> None:
    from diffusers import EasyAnimateInpaintPipeline
    from diffusers.pipelines.easyanimate.pipeline_easyanimate_inpaint import get_image_to_video_latent

    folder = tiny_models.build_easyanimate_v51_inp(tmp_path / "model")
    _assert_safetensors_only(folder)
    pipe = _load(EasyAnimateInpaintPipeline, folder)
    assert pipe.vae.config.cache_mag_vae is True
    assert pipe.tokenizer.chat_template

    # Start and end frames, as the pack's I2V path sends them.
    video, mask = get_image_to_video_latent([_image()], _image(seed=1), 5, (64, 64))
    out = pipe(
        prompt=PROMPT,
        negative_prompt="",
        video=video,
        mask_video=mask,
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    _assert_video_latents(out, (1, 16, 2, 8, 8))

    video, mask = get_image_to_video_latent([_image(32, 32)], None, 5, (32, 32))
    frames = pipe(
        prompt=PROMPT,
        negative_prompt="",
        video=video,
        mask_video=mask,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=1,
        output_type="np",
    ).frames
    _assert_frames(frames, 5, 32)


def test_easyanimate_v5_legacy_layout(tmp_path: Path) -> None:
    folder = tiny_models.build_easyanimate_v5_legacy_layout(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    for key in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae", "scheduler"):
        assert key in index
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert (folder / sub / "config.json").is_file()
    transformer_config = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer_config["text_embed_dim_t5"] is not None
    assert not [p for p in folder.rglob("*") if p.suffix in FORBIDDEN_SUFFIXES | {".safetensors"}]


# --------------------------------------------------------------------------- I2VGen-XL


def test_i2vgenxl(tmp_path: Path) -> None:
    from diffusers import I2VGenXLPipeline

    folder = tiny_models.build_i2vgenxl(tmp_path / "model")
    _assert_safetensors_only(folder)
    pipe = _load(I2VGenXLPipeline, folder)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "leading"
    # The pipeline samples the image latent with the global RNG, not the generator.
    torch.manual_seed(0)
    out = pipe(
        image=_image(),
        prompt=PROMPT,
        negative_prompt="",
        height=64,
        width=64,
        num_frames=4,
        num_inference_steps=2,
        output_type="latent",
        # The default clip_skip=1 reaches CLIPTextModel.text_model, gone in transformers 5.
        clip_skip=None,
        generator=torch.Generator().manual_seed(0),
    ).frames
    _assert_video_latents(out, (1, 4, 4, 8, 8))
    frames = pipe(
        image=_image(32, 32),
        prompt=PROMPT,
        height=32,
        width=32,
        num_frames=4,
        num_inference_steps=1,
        output_type="np",
        clip_skip=None,
    ).frames
    _assert_frames(frames, 4, 32)


# --------------------------------------------------------------------------- build_all / determinism / CLI


def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = tiny_models.build_wan21_i2v(tmp_path / "a")
    b = tiny_models.build_wan21_i2v(tmp_path / "b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_build_all_reuses_complete_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "tiny-easyanimate-v5-legacy"
    calls: list[Path] = []
    real = tiny_models.BUILDERS[name]

    def counting(folder: Path) -> Path:
        calls.append(folder)
        return real(folder)

    monkeypatch.setitem(tiny_models.BUILDERS, name, counting)
    out = tiny_models.build_all(tmp_path, only=[name])
    assert out == {name: tmp_path / name}
    assert (tmp_path / name / "model_index.json").is_file()
    assert len(calls) == 1

    tiny_models.build_all(tmp_path, only=[name])
    assert len(calls) == 1, "a complete folder was rebuilt"

    # A changed script (different stamp) must rebuild.
    monkeypatch.setattr(tiny_models, "source_stamp", lambda: "changed\n")
    tiny_models.build_all(tmp_path, only=[name])
    assert len(calls) == 2
    assert (tmp_path / name / tiny_models.STAMP_FILE).read_text() == "changed\n"
    assert [p.name for p in tmp_path.iterdir()] == [name], "temporary build folders were left behind"

    with pytest.raises(KeyError):
        tiny_models.build_all(tmp_path, only=["no-such-model"])


def test_registry_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert set(tiny_models.BUILDERS) == {
        "tiny-wan21-i2v",
        "tiny-wan21-flf2v",
        "tiny-wan22-i2v-a14b",
        "tiny-wan22-ti2v-5b",
        "tiny-wan21-t2v",
        "tiny-wan22-t2v-a14b",
        "tiny-easyanimate-v51-inp",
        "tiny-easyanimate-v5-legacy",
        "tiny-i2vgenxl",
    }
    assert tiny_models.main([str(tmp_path), "--only", "tiny-easyanimate-v5-legacy"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [str(tmp_path / "tiny-easyanimate-v5-legacy")]
