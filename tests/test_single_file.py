"""Wan pipelines from ComfyUI-format single files (engine only, no server)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import single_file_helpers as sfh
from vramwise.errors import InputError, ModelFolderError
from vramwise.single_file import SingleFileSpec, detect_transformer
from vramwise.single_file.keys import (
    transformer_name_map, transformer_to_original, wan21_vae_to_original, wan22_vae_to_diffusers, wan22_vae_to_original,
)
from vramwise.single_file.reader import read_header
from vramwise.single_file.transformer import load_transformer
from vramwise.single_file.vae import load_vae

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wan21(tiny_models_root: Path, tmp_path_factory) -> dict[str, Path]:
    return sfh.write_wan21_set(tiny_models_root / "tiny-wan21-i2v", tmp_path_factory.mktemp("sf-wan21"))


def _latents(pipe, seed: int = 0) -> torch.Tensor:
    img = Image.new("RGB", (64, 64), (200, 120, 40))
    with torch.no_grad():
        return pipe(
            image=img, prompt="a yellow ball rolls to the right", negative_prompt="blurry", height=64, width=64,
            num_frames=5, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
            output_type="latent", max_sequence_length=512,
        ).frames


@pytest.mark.parametrize("model,component", [
    ("tiny-wan21-i2v", "transformer"), ("tiny-wan21-flf2v", "transformer"),
    ("tiny-wan22-i2v-a14b", "transformer_2"), ("tiny-wan22-ti2v-5b", "transformer"),
])
def test_inverse_key_mapping_round_trips_through_diffusers_converter(tiny_models_root, model, component):
    names = list(sfh.diffusers_state(tiny_models_root / model, component))
    for prefix in ("", sfh.PREFIX):
        original = [transformer_to_original(n, prefix) for n in names]
        assert len(set(original)) == len(names)
        back = transformer_name_map(original)
        assert {k: v for k, v in back.items()} == {n: transformer_to_original(n, prefix) for n in names}


@pytest.mark.parametrize("model,component,expected", [
    ("tiny-wan21-i2v", "transformer", "wan2.1-i2v"),
    ("tiny-wan21-flf2v", "transformer", "wan2.1-flf2v"),
    ("tiny-wan22-i2v-a14b", "transformer", "wan2.2-i2v-a14b"),
    ("tiny-wan22-ti2v-5b", "transformer", "wan2.2-ti2v-5b"),
])
def test_detection_from_header(tiny_models_root, tmp_path, model, component, expected):
    for prefix in ("", sfh.PREFIX):
        path = sfh.write_transformer(tiny_models_root / model, tmp_path / f"{model}{bool(prefix)}.safetensors", component=component, prefix=prefix)
        info = detect_transformer(path)
        assert info.family_id == expected
        cfg = json.loads((tiny_models_root / model / component / "config.json").read_text())
        for key in ("in_channels", "out_channels", "num_layers", "num_attention_heads", "ffn_dim", "text_dim", "image_dim", "pos_embed_seq_len"):
            assert info.config[key] == cfg[key], key


def test_text_to_video_file_is_refused_with_what_it_is(tiny_models_root, tmp_path):
    path = sfh.write_transformer(tiny_models_root / "tiny-wan21-t2v", tmp_path / "t2v.safetensors")
    with pytest.raises(ModelFolderError, match="text-to-video"):
        detect_transformer(path)


def test_other_components_picked_as_diffusion_model_are_named(wan21):
    with pytest.raises(ModelFolderError, match="text encoder"):
        detect_transformer(wan21["text_encoder"])


def test_single_files_give_the_same_latents_as_the_diffusers_folder(tiny_models_root, wan21):
    from diffusers import WanImageToVideoPipeline

    ref = WanImageToVideoPipeline.from_pretrained(tiny_models_root / "tiny-wan21-i2v", dtype=torch.float32)
    pipe = SingleFileSpec.create(**wan21).load(torch.float32)
    assert pipe.tokenizer("a yellow ball").input_ids == ref.tokenizer("a yellow ball").input_ids
    torch.testing.assert_close(_latents(pipe), _latents(ref), atol=1e-5, rtol=0)


def test_fp8_scaled_folds_scales_and_matches_the_original_within_fp8_error(tiny_models_root, tmp_path, wan21):
    folder = tiny_models_root / "tiny-wan21-i2v"
    info = detect_transformer(wan21["diffusion_model"])
    exact = load_transformer(wan21["diffusion_model"], info, torch.float32).state_dict()
    scaled = sfh.write_transformer(folder, tmp_path / "scaled.safetensors", variant="fp8_scaled")
    got = load_transformer(scaled, detect_transformer(scaled), torch.float32).state_dict()
    assert set(got) == set(exact)
    for name, w in exact.items():
        # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 of the value; with a per-tensor scale the
        # smallest values fall into subnormals, so bound the error by 1/16 of the tensor's max magnitude.
        tol = w.abs().max().item() / 16 + 1e-12
        assert (got[name] - w).abs().max().item() <= tol, name
    # Without folding (what a loader that drops scale_weight gives) the matrices are off by orders of magnitude.
    from safetensors import safe_open

    with safe_open(str(scaled), "pt") as f:
        raw = f.get_tensor(sfh.PREFIX + "blocks.0.self_attn.q.weight").float()
    assert (raw - exact["blocks.0.attn1.to_q.weight"]).abs().max() > 10 * exact["blocks.0.attn1.to_q.weight"].abs().max()


def test_plain_fp8_file_stays_fp8_when_fp8_storage_is_chosen(tiny_models_root, tmp_path):
    path = sfh.write_transformer(tiny_models_root / "tiny-wan21-i2v", tmp_path / "fp8.safetensors", variant="fp8_e4m3fn")
    model = load_transformer(path, detect_transformer(path), torch.bfloat16, keep_fp8=True)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.patch_embedding.weight.dtype == torch.bfloat16  # kept in compute precision (fp8 skip list)
    upcast = load_transformer(path, detect_transformer(path), torch.bfloat16)
    assert upcast.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_fp8_scaled_pipeline_runs_close_to_the_original(tiny_models_root, tmp_path, wan21):
    scaled = sfh.write_transformer(tiny_models_root / "tiny-wan21-i2v", tmp_path / "scaled.safetensors", variant="fp8_scaled")
    ref = _latents(SingleFileSpec.create(**wan21).load(torch.float32))
    got = _latents(SingleFileSpec.create(**dict(wan21, diffusion_model=scaled)).load(torch.float32))
    assert torch.isfinite(got).all()
    # fp8 weight rounding (~6% per weight) on a random 2-layer model: outputs agree to a few percent of their range.
    assert (got - ref).abs().max() < 0.25 * ref.abs().max()


def test_truncated_file_gives_a_clear_error(wan21, tmp_path):
    data = wan21["diffusion_model"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        detect_transformer(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        detect_transformer(junk)


def test_mismatched_text_encoder_is_named(wan21, tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    other = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    path = tmp_path / "t5_small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items() if k != "encoder.embed_tokens.weight"}, str(path))
    with pytest.raises(InputError, match="text_encoder.*hidden size 16.*expects 32"):
        SingleFileSpec.create(**dict(wan21, text_encoder=path)).check()


def test_text_encoder_without_spiece_model_says_where_a_tokenizer_goes(tiny_models_root, wan21, tmp_path):
    path = sfh.write_text_encoder(tiny_models_root / "tiny-wan21-i2v", tmp_path / "umt5_nospm.safetensors", with_spiece=False)
    with pytest.raises(InputError, match="spiece_model.*umt5_nospm_tokenizer"):
        SingleFileSpec.create(**dict(wan21, text_encoder=path)).load(torch.float32)


def test_files_that_do_not_belong_together_are_refused(tiny_models_root, wan21, tmp_path):
    a14b = tiny_models_root / "tiny-wan22-i2v-a14b"
    high = sfh.write_transformer(a14b, tmp_path / "high.safetensors", component="transformer")
    low = sfh.write_transformer(a14b, tmp_path / "low.safetensors", component="transformer_2")
    base = dict(wan21, diffusion_model=high, clip_vision=None)
    with pytest.raises(InputError, match="diffusion_model_2"):
        SingleFileSpec.create(**base).check()
    with pytest.raises(InputError, match="clip_vision"):
        SingleFileSpec.create(**dict(base, diffusion_model_2=low, clip_vision=wan21["clip_vision"])).check()
    with pytest.raises(InputError, match="clip_vision"):
        SingleFileSpec.create(**dict(wan21, clip_vision=None)).check()
    info, info2 = SingleFileSpec.create(**dict(base, diffusion_model_2=low)).check()
    assert info.family_id == "wan2.2-i2v-a14b" and info2 is not None


def test_a14b_pair_assembles_two_experts(tiny_models_root, wan21, tmp_path):
    a14b = tiny_models_root / "tiny-wan22-i2v-a14b"
    high = sfh.write_transformer(a14b, tmp_path / "high.safetensors", component="transformer")
    low = sfh.write_transformer(a14b, tmp_path / "low.safetensors", component="transformer_2")
    pipe = SingleFileSpec.create(**dict(wan21, diffusion_model=high, diffusion_model_2=low, clip_vision=None)).load(torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.9 and pipe.image_encoder is None


@pytest.fixture(scope="module")
def wan21_vae():
    return sfh.tiny_wan21_vae()


def test_wan21_vae_inverse_mapping_round_trips_through_diffusers_converter(wan21_vae):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    names = list(wan21_vae.state_dict())
    original = {wan21_vae_to_original(n): n for n in names}
    assert len(original) == len(names)
    assert "decoder.upsamples.4.shortcut.weight" in original and "decoder.middle.2.residual.6.weight" in original
    assert convert_wan_vae_to_diffusers({o: o for o in original}) == {n: o for o, n in original.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan21_vae_in_the_original_layout_decodes_like_the_diffusers_model(wan21_vae, tmp_path, dtype):
    # No metadata: the structure comes from the shipped Wan2.1 config, the widths from shapes, as for users' files.
    path = sfh.write_wan21_vae_original(wan21_vae, tmp_path / "wan_2.1_vae.safetensors", dtype=dtype)
    assert read_header(path).metadata == {}
    got = load_vae(path, torch.float32, z_dim=16)
    ref = wan21_vae
    if dtype is torch.bfloat16:  # what a bf16 file holds: compare with the same rounded weights
        ref = sfh.tiny_wan21_vae()
        ref.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out, want = got.decode(z).sample, ref.decode(z).sample
        assert (want.abs() < 0.99).float().mean() > 0.9  # not saturated by the decoder's clamp
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean, atol=1e-5, rtol=0)


def test_wan21_vae_with_another_structure_in_the_original_layout_is_refused(tiny_models_root, tmp_path):
    from diffusers import AutoencoderKLWan

    small = AutoencoderKLWan.from_pretrained(tiny_models_root / "tiny-wan21-i2v" / "vae")  # one res block per stage
    path = sfh.write_wan21_vae_original(small, tmp_path / "odd_vae.safetensors")
    with pytest.raises(ModelFolderError, match="does not fit a Wan VAE"):
        load_vae(path, torch.float32)


def test_wan22_vae_mapping_round_trips(tiny_models_root):
    # The original names were checked once against ComfyUI's own Wan2.2 VAE module (comfy.ldm.wan.vae2_2, same
    # tiny sizes): identical names, strict load, decode equal to diffusers' within 1.3e-6.
    from diffusers import AutoencoderKLWan

    # The published structure (2 res blocks per stage) and the tiny folder's (1 per stage: resamplers move up).
    for vae in (AutoencoderKLWan.from_pretrained(tiny_models_root / "tiny-wan22-ti2v-5b" / "vae"), sfh.tiny_wan22_vae()):
        names = list(vae.state_dict())
        original = wan22_vae_to_original(names)
        assert len(set(original.values())) == len(names)
        assert {wan22_vae_to_diffusers(o): n for n, o in original.items()} == {n: n for n in names}
    assert original["decoder.up_blocks.0.upsampler.time_conv.weight"] == "decoder.upsamples.0.upsamples.3.time_conv.weight"
    assert original["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == "encoder.downsamples.1.downsamples.0.shortcut.weight"


def test_wan22_vae_in_the_original_layout_decodes_like_the_diffusers_model(tmp_path):
    ref = sfh.tiny_wan22_vae()
    path = sfh.write_wan22_vae_original(ref, tmp_path / "wan2.2_vae.safetensors")
    got = load_vae(path, torch.float32, z_dim=48)
    assert (got.config.is_residual, got.config.patch_size, got.config.decoder_base_dim, got.config.scale_factor_spatial) == (True, 2, 12, 16)
    assert len(got.config.latents_mean) == 48  # the published Wan2.2 statistics (shipped config)
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref.decode(z).sample
        assert (want.abs() < 0.99).float().mean() > 0.9
        torch.testing.assert_close(got.decode(z).sample, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="48 latent channels.*16.*wan_2.1_vae"):
        load_vae(path, torch.float32, z_dim=16)


def test_gguf_header_gives_names_real_shapes_and_metadata(tiny_models_root, tmp_path):
    folder = tiny_models_root / "tiny-wan21-i2v"
    path = sfh.write_transformer_gguf(folder, tmp_path / "q8.gguf", "Q8_0", prefix=sfh.PREFIX, flatten_5d=True)
    header = read_header(path)
    assert header.kind == "gguf" and header.reshaped == (sfh.PREFIX + "patch_embedding.weight",)
    assert header.tensors[sfh.PREFIX + "patch_embedding.weight"].shape == (24, 36, 1, 2, 2)
    assert header.tensors[sfh.PREFIX + "blocks.0.ffn.2.weight"].shape == (24, 32)
    assert header.tensors[sfh.PREFIX + "blocks.0.ffn.2.weight"].dtype is None  # quantized
    assert header.tensors[sfh.PREFIX + "blocks.0.self_attn.q.weight"].dtype is torch.float16  # 24-wide rows: F16
    info = detect_transformer(path)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert info.is_gguf and info.family_id == "wan2.1-i2v" and info.label.endswith("GGUF")
    for key in ("in_channels", "out_channels", "num_layers", "num_attention_heads", "ffn_dim", "text_dim", "image_dim", "patch_size"):
        assert info.config[key] == cfg[key], key


@pytest.fixture(scope="module")
def bf16_latents(tiny_models_root, tmp_path_factory, wan21):
    path = sfh.write_transformer(tiny_models_root / "tiny-wan21-i2v", tmp_path_factory.mktemp("bf16") / "bf16.safetensors", variant="bf16")
    return _latents(SingleFileSpec.create(**dict(wan21, diffusion_model=path)).load(torch.float32))


@pytest.mark.parametrize("qtype,flatten", [("F16", False), ("Q8_0", True)])
def test_gguf_pipeline_gives_latents_close_to_the_bf16_original(tiny_models_root, tmp_path, wan21, bf16_latents, qtype, flatten):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    path = sfh.write_transformer_gguf(tiny_models_root / "tiny-wan21-i2v", tmp_path / f"{qtype}.gguf", qtype, flatten_5d=flatten)
    pipe = SingleFileSpec.create(**dict(wan21, diffusion_model=path)).load(torch.float32)
    ffn_out = pipe.transformer.blocks[0].ffn.net[2]
    if qtype == "Q8_0":  # the 32-wide rows stay quantized, dequantized per layer at compute time
        assert isinstance(ffn_out, GGUFLinear) and isinstance(ffn_out.weight, GGUFParameter)
    else:
        assert ffn_out.weight.dtype == torch.float32
    got = _latents(pipe)
    assert torch.isfinite(got).all()
    # Reference: the bf16 file (8 mantissa bits: relative rounding <= 2^-9 per weight). F16 (11 bits) is finer.
    # Q8_0 stores blocks of 32 weights as int8 times one scale (block max / 127): error <= block max / 254,
    # ~0.4% of the largest weight of the block, the same order as bf16's own rounding. Through two layers and two
    # steps both stay within 1% of the latents' range; a mis-mapped or mis-dequantized tensor is off by ~100%.
    tol = 0.01 * bf16_latents.abs().max()  # measured: F16 and Q8_0 both ~0.2%
    assert (got - bf16_latents).abs().max() < tol


def test_gguf_runs_with_group_offload_and_refuses_sequential(tiny_models_root, tmp_path, wan21):
    from vramwise.loader import LoadOptions, load_pipeline
    from vramwise.offload import OffloadMode
    from vramwise.precision import WeightDtype

    path = sfh.write_transformer_gguf(tiny_models_root / "tiny-wan21-i2v", tmp_path / "q8.gguf", "Q8_0")
    spec = SingleFileSpec.create(**dict(wan21, diffusion_model=path))

    def options(mode: str) -> LoadOptions:
        return LoadOptions(folder=path, offload_mode=OffloadMode.parse(mode), weight_dtype=WeightDtype.parse("bf16"), text_encoder_on_cpu=False, source=spec)

    with pytest.raises(InputError, match="offload_mode.*sequential.*GGUF.*pick one of none, model, group"):
        load_pipeline(options("sequential"), torch.device("cpu"))
    loaded = load_pipeline(options("group"), torch.device("cpu"))  # no CUDA: the hooks run with the CPU as both devices
    assert torch.isfinite(_latents(loaded.pipe).float()).all()


def test_gguf_with_fp8_storage_is_refused(tiny_models_root, tmp_path, wan21):
    path = sfh.write_transformer_gguf(tiny_models_root / "tiny-wan21-i2v", tmp_path / "f16.gguf", "F16")
    with pytest.raises(InputError, match="weight_dtype.*GGUF"):
        SingleFileSpec.create(**dict(wan21, diffusion_model=path)).load(torch.bfloat16, keep_fp8=True)


_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from vramwise.single_file.reader import load_tensors
    import safetensors.torch  # imports done before the baseline
    path = Path(sys.argv[1])
    def hwm():  # peak RSS of this process image (ru_maxrss would carry the parent's peak across exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = hwm()
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        names = {{k: k for k in f.keys()}}
    state = load_tensors(path, names, torch.bfloat16)
    touched = sum(float(t.float().sum()) for t in state.values())  # fault in every page of the result
    peak = hwm()
    print(base, peak, file=sys.stderr)
    print((peak - base) / path.stat().st_size)
    """
)


def rss_ratio(path: Path) -> float:
    """Peak RSS growth while loading ``path`` to bf16, divided by the file size (fresh process)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.format(repo=str(REPO)), str(path)], capture_output=True, text=True, check=True)
    rss_ratio.last_stderr = out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_loading_does_not_hold_a_second_copy_of_the_file(tmp_path):
    # 48 bf16 matrices of 2 MiB each (96 MiB): a full fp32 copy would show as a ratio >= 2.
    g = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.w": torch.randn(1024, 1024, generator=g).to(torch.bfloat16) for i in range(48)}
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    del state
    ratio = rss_ratio(path)
    assert ratio <= 1.3, ratio
