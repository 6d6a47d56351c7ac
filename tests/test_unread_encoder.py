"""The text encoder is not read at load when the plan can stream it (encoder_weights.unread_encoder), and under a
leaf streamer a new prompt reads it from its files one leaf at a time (EncoderWeights.streamed_from_files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vramwise.encoder_weights import ENCODER_WEIGHTS
from vramwise.memory import planner
from vramwise.memory.estimates import PROCESS_HOST_BYTES, STREAMED_COMPONENT_PEAK
from vramwise.offload.leaf_stream import _leaves, stream_leaves
from vramwise.prompt_cache import PROMPT_CACHE
from vramwise.sampling import generate

from engine_helpers import load_tiny, tiny_wan_request
from test_planner_host import GiB, RUN, wan21

CUDA = torch.device("cuda")  # a device kind for the planner's host facts; nothing runs on it


@pytest.fixture(autouse=True)
def empty_cache():
    PROMPT_CACHE.clear()
    yield
    PROMPT_CACHE.clear()


def _copy(tiny_models_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-wan21-i2v"
    shutil.copytree(tiny_models_root / "tiny-wan21-i2v", folder)
    return folder


def _read_at_load(folder: Path):
    """The same plan with the text encoder read at load (an encoder kept on the CPU is; here all is on the CPU)."""
    model = load_tiny(folder, mode="stream", text_on_cpu=True)
    assert not ENCODER_WEIGHTS.is_released(model.loaded.pipe.text_encoder)
    return model


def test_a_stream_load_reads_only_the_text_encoders_headers(tiny_models_root, tmp_path):
    folder = _copy(tiny_models_root, tmp_path)
    weights = sorted((folder / "text_encoder").glob("*.safetensors"))
    kept = {p: p.read_bytes() for p in weights}
    for p in weights:  # header only: any read of a weight would fail on the truncated file
        header = 8 + int.from_bytes(kept[p][:8], "little")
        p.write_bytes(kept[p][:header])
    model = load_tiny(folder, mode="stream")
    encoder = model.loaded.pipe.text_encoder
    assert ENCODER_WEIGHTS.is_released(encoder) and sum(p.numel() for p in encoder.parameters()) == 0
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight  # tied as from_pretrained ties it
    will_hold = ENCODER_WEIGHTS.released_bytes(encoder)
    assert any("not read at load" in n for n in model.loaded.notes), model.loaded.notes
    for p, b in kept.items():
        p.write_bytes(b)
    unread = generate(model, tiny_wan_request()).samples  # the first encode reads it
    PROMPT_CACHE.clear()
    normal = _read_at_load(folder)
    assert will_hold == sum(p.numel() * p.element_size() for p in normal.loaded.pipe.text_encoder.parameters())
    assert torch.equal(unread, generate(normal, tiny_wan_request()).samples)


def test_other_modes_and_fp8_read_the_text_encoder_at_load(tiny_models_root):
    for mode, dtype in (("none", "bf16"), ("group", "bf16"), ("stream", "fp8_e4m3fn")):
        encoder = load_tiny(tiny_models_root / "tiny-wan21-i2v", mode=mode, dtype=dtype).loaded.pipe.text_encoder
        assert not ENCODER_WEIGHTS.is_released(encoder), (mode, dtype)
        assert sum(p.numel() for p in encoder.parameters()) > 0


def test_a_new_prompt_under_a_leaf_streamer_reads_one_leaf_at_a_time_from_the_files(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan21-i2v", mode="stream")
    encoder = model.loaded.pipe.text_encoder
    # place_stream adds this on CUDA for encoders over STREAM_OTHERS_ABOVE; on the CPU the test adds it itself
    streamer = stream_leaves(encoder, torch.device("cpu"))
    model.loaded.placement.leaf_streamers.append(streamer)
    held: list[tuple[str, int]] = []
    hooks = []
    for name, leaf in encoder.named_modules():
        if leaf in _leaves(encoder):  # registered after the streamer's pre-hook: runs once the leaf's weights are in
            hooks.append(leaf.register_forward_pre_hook(
                lambda m, a, name=name: held.append((name, sum(p.numel() for p in encoder.parameters())))))
    streamed, reloads = ENCODER_WEIGHTS.streamed, ENCODER_WEIGHTS.reloads
    try:
        first = generate(model, tiny_wan_request(prompt="a dog runs")).samples
        second = generate(model, tiny_wan_request(prompt="a cat sleeps")).samples
    finally:
        for h in hooks:
            h.remove()
    assert ENCODER_WEIGHTS.streamed == streamed + 2 and ENCODER_WEIGHTS.reloads == reloads  # never restored whole
    assert ENCODER_WEIGHTS.is_released(encoder) and sum(p.numel() for p in encoder.parameters()) == 0
    PROMPT_CACHE.clear()
    normal = _read_at_load(tiny_models_root / "tiny-wan21-i2v")
    own = {n: sum(p.numel() for p in m._parameters.values() if p is not None)
           for n, m in normal.loaded.pipe.text_encoder.named_modules()}
    # while a leaf runs, the encoder holds that leaf's weights and nothing else
    assert held and all(n == own[name] for name, n in held), held
    assert torch.equal(first, generate(normal, tiny_wan_request(prompt="a dog runs")).samples)
    assert torch.equal(second, generate(normal, tiny_wan_request(prompt="a cat sleeps")).samples)


def test_on_cuda_the_host_estimate_counts_the_process_and_one_leaf_of_a_file_streamed_encoder():
    comp = wan21()
    fp8 = planner.Plan("stream", fp8=True)
    plain = planner.estimate(fp8, comp, RUN).host_bytes
    on_cuda = planner.estimate(fp8, planner.on_host(comp, CUDA, ("text_encoder",)), RUN).host_bytes
    te = comp.others["text_encoder"]
    assert on_cuda == plain - te + STREAMED_COMPONENT_PEAK + PROCESS_HOST_BYTES
    # read at load (not unread): the whole encoder counts, the process too
    loaded = planner.estimate(fp8, planner.on_host(comp, CUDA), RUN).host_bytes
    assert loaded == plain + PROCESS_HOST_BYTES
    # the sequential plan needs the whole encoder on the host
    seq = planner.Plan("sequential", fp8=True, cfg_batch=False)
    assert planner.estimate(seq, planner.on_host(comp, CUDA, ("text_encoder",)), RUN).host_bytes == \
        planner.estimate(seq, comp, RUN).host_bytes + PROCESS_HOST_BYTES
    assert planner.on_host(comp, torch.device("cpu"), ("text_encoder",)) == comp


def test_a_32gib_host_with_an_unread_encoder_plans_fp8_stream_within_the_budget():
    comp = planner.on_host(wan21(), CUDA, ("text_encoder",))
    est = planner.choose(comp, RUN, vram_budget=8 * GiB, host_budget=32 * GiB)
    assert est.plan == planner.Plan("stream", fp8=True) and est.host_bytes <= 32 * GiB
    assert planner.estimate(planner.Plan("stream"), comp, RUN).host_bytes > 32 * GiB  # bf16 passed over
