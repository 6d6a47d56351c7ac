"""GGUF diffusion models as users download them: K-quants (Q4_K_M, Q5_K_M, Q6_K files), every offload path, and
what a GGUF text encoder gets."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import single_file_helpers as sfh
from engine_helpers import Recorder, tiny_wan_request
from vramwise.errors import InputError
from vramwise.handles import VramwiseModel
from vramwise.loader import LoadOptions, load_pipeline
from vramwise.memory.planned_run import generate_with_plan
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.single_file import SingleFileSpec

# A "Q4_K_M" file is mostly Q4_K blocks with some tensors in Q6_K; "Q5_K_M" mostly Q5_K; these are the block types.
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]
# Largest error of the simple min/max quantizer, as a share of the row's largest weight: half a quantization step
# (range / 15, / 31, 2 * amax / 63) plus the 6/8-bit rounding of the sub-block scales. Measured: 4.8%, 2.3%, 1.6%.
MAX_REL_ERROR = {"Q4_K": 0.07, "Q5_K": 0.035, "Q6_K": 0.025}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quant_blocks_dequantize_with_ggufs_own_dequantizer(qtype):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor, GGUFParameter

    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    quant = gguf.GGMLQuantizationType[qtype]
    blocks = sfh.quantize_k(x, qtype)
    assert blocks.shape == (8, 2 * gguf.GGML_QUANT_SIZES[quant][1])
    ref = gguf.quants.dequantize(blocks, quant)
    err = np.abs(ref - x).max(-1) / np.abs(x).max(-1)
    assert err.max() < MAX_REL_ERROR[qtype], err
    # The loader's path (diffusers' torch dequantizer) reads the same blocks to the same values.
    # It computes in float16 (the blocks' scale type): equal up to float16 steps at the largest products.
    ours = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(blocks), quant_type=quant)).float().numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2**-9 * np.abs(x).max())


@pytest.fixture(scope="module")
def wide(tiny_models_root: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf-wide")
    folder = sfh.wide_wan21_folder(tiny_models_root / "tiny-wan21-i2v", root / "wan21-wide")
    files = sfh.write_wan21_set(folder, root / "files")
    ref = _latents(load_pipeline(_options(files, "none"), torch.device("cpu")))
    return {"folder": folder, "files": files, "root": root, "ref": ref}


def _options(files: dict, mode: str) -> LoadOptions:
    spec = SingleFileSpec.create(**files)
    return LoadOptions(folder=files["diffusion_model"], offload_mode=OffloadMode.parse(mode),
                       weight_dtype=WeightDtype.parse("bf16"), text_encoder_on_cpu=False, source=spec)


def _latents(loaded) -> torch.Tensor:
    latent, _notes = generate_with_plan(VramwiseModel(loaded), tiny_wan_request(), Recorder())
    return latent.samples.float()


def _gguf(wide: dict, qtype: str) -> dict:
    path = wide["root"] / f"wan21-wide-{qtype}.gguf"
    if not path.exists():
        sfh.write_transformer_gguf(wide["folder"], path, qtype, flatten_5d=True)
    return {**wide["files"], "diffusion_model": path}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quant_file_stays_quantized_and_samples_close_to_the_original(wide, qtype):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    files = _gguf(wide, qtype)
    loaded = load_pipeline(_options(files, "none"), torch.device("cpu"))
    weight = loaded.pipe.transformer.blocks[0].ffn.net[2].weight  # [24, 256]: one super-block per row
    assert isinstance(weight, GGUFParameter) and weight.quant_type.name == qtype
    got = _latents(loaded)
    assert torch.isfinite(got).all()
    # Each 256-wide layer is off by at most MAX_REL_ERROR of its weights; through 2 layers and 2 steps the latents
    # stay within a few percent of their range (a mis-read block layout gives ~100%).
    assert (got - wide["ref"]).abs().max() < 4 * MAX_REL_ERROR[qtype] * wide["ref"].abs().max()


# The stream engine's lean forward and batched CFG passes order bf16 arithmetic differently from the stock forward:
# the same tiny model from a .safetensors file differs by 1.3% of the latents' range (measured), GGUF or not.
# The other placements run the stock forward and match exactly.
PLACEMENT_TOLERANCE = {"stream": 0.02, "auto": 0.02, "model": 1e-6, "group": 1e-6}


@pytest.mark.parametrize("mode", ["stream", "auto", "model", "group"])
def test_gguf_runs_through_every_offload_path_but_sequential(wide, mode):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    files = _gguf(wide, "Q4_K")
    plain = _latents(load_pipeline(_options(files, "none"), torch.device("cpu")))
    loaded = load_pipeline(_options(files, mode), torch.device("cpu"))
    got = _latents(loaded)
    assert isinstance(loaded.pipe.transformer.blocks[0].ffn.net[2].weight, GGUFParameter)
    assert (got - plain).abs().max() <= PLACEMENT_TOLERANCE[mode] * plain.abs().max()


def test_a_gguf_text_encoder_is_refused_naming_the_files_that_work(wide, tmp_path):
    path = tmp_path / "umt5-xxl-encoder-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_tensor("enc.blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError) as err:
        SingleFileSpec.create(**{**wide["files"], "text_encoder": path}).load(torch.bfloat16)
    message = str(err.value)
    assert message.startswith("text_encoder:") and "GGUF" in message and "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in message
