"""The parallel engine's rules without processes: which families may split, head and token counts, attention
backends, the tensor wire format, the CPU device-count shim."""

from __future__ import annotations

import pytest
import torch

from vramwise.errors import InputError
from vramwise.families.easyanimate import EASYANIMATE_FAMILIES
from vramwise.families.i2vgenxl import I2VGENXL_FAMILIES
from vramwise.families.wan import WAN_FAMILIES
from vramwise.parallel import protocol
from vramwise.parallel.attention import resolve_backend
from vramwise.parallel.cancel_flag import CancelFlag
from vramwise.parallel.device_count import at_least_one_device
from vramwise.parallel.errors import describe_exit
from vramwise.parallel.support import check_device_count, check_family, check_heads, check_tokens, video_tokens


@pytest.mark.parametrize("cls", [*EASYANIMATE_FAMILIES, *I2VGENXL_FAMILIES], ids=lambda c: c.id)
def test_families_without_a_context_parallel_plan_refuse_more_than_one_gpu(cls):
    family = cls()
    check_family(family, 1)  # one GPU is always fine
    with pytest.raises(InputError) as e:
        check_family(family, 2)
    assert e.value.input_name == "gpus" and family.label in str(e.value) and "set gpus to 1" in str(e.value)


@pytest.mark.parametrize("cls", WAN_FAMILIES, ids=lambda c: c.id)
def test_every_wan_family_may_split_across_gpus(cls):
    check_family(cls(), 4)


def test_zero_gpus_is_refused():
    with pytest.raises(InputError, match="gpus"):
        check_family(WAN_FAMILIES[0](), 0)


def test_ulysses_degree_must_divide_the_head_count_and_the_error_lists_what_fits():
    check_heads({"num_attention_heads": 40}, 4)
    check_heads({"num_attention_heads": 40}, 8)
    with pytest.raises(InputError) as e:
        check_heads({"num_attention_heads": 40}, 3)
    assert "40 attention heads" in str(e.value) and "2 or 4 or 5 or 8" in str(e.value)


def test_token_count_must_split_evenly():
    # 480x832x81 Wan: 21 latent frames x 30 x 52 patches = 32,760 tokens, which 2, 4 and 8 GPUs split.
    tokens = video_tokens((1, 36, 21, 60, 104), (1, 2, 2))
    assert tokens == 32_760
    for n in (2, 4, 8):
        check_tokens(tokens, n)
    with pytest.raises(InputError, match="cannot split evenly"):
        check_tokens(7 * 3 * 5, 2)


def test_more_gpus_than_visible_is_refused():
    check_device_count(2, 2)
    with pytest.raises(InputError, match="2 visible"):
        check_device_count(4, 2)


def test_native_attention_runs_ulysses_but_not_ring():
    assert resolve_backend(None, 1) == "native"
    with pytest.raises(InputError) as e:
        resolve_backend("native", 2)
    assert e.value.input_name == "ring_degree" and "log-sum-exp" in str(e.value)
    assert resolve_backend("_native_cudnn", 2) == "_native_cudnn"
    with pytest.raises(InputError, match="no context-parallel support"):
        resolve_backend("xformers", 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
def test_tensors_survive_the_wire_format_bit_for_bit(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(dtype)
    msg = protocol.call(7, "transformer", {"hidden_states": t, "nested": [t[0], (t[1],)], "scale": 0.5,
                                          "empty": torch.empty(0, 4, dtype=dtype), "scalar": t[0, 0, 0],
                                          "expanded": t[0, 0, :1].expand(4)})
    back = protocol.unpack(msg["kwargs"])
    assert back["hidden_states"].dtype == dtype and torch.equal(back["hidden_states"], t)
    assert torch.equal(back["nested"][0], t[0]) and torch.equal(back["nested"][1][0], t[1])
    assert back["scale"] == 0.5 and back["empty"].shape == (0, 4) and torch.equal(back["scalar"], t[0, 0, 0])
    assert torch.equal(back["expanded"], t[0, 0, :1].expand(4))
    # Only plain types cross: the worker imports the pack under another name (see protocol.py).
    assert isinstance(msg["kwargs"]["hidden_states"], tuple)


def test_device_count_shim_only_applies_inside_the_block():
    original = torch.accelerator.device_count
    before = torch.accelerator.device_count()
    with at_least_one_device():
        assert torch.accelerator.device_count() >= 1
    assert torch.accelerator.device_count is original and torch.accelerator.device_count() == before


def test_cancel_flag_is_seen_by_a_second_mapping_and_the_owner_removes_the_file():
    owner = CancelFlag.create()
    other = CancelFlag.open(owner.path)
    assert not other.is_set()
    owner.set()
    assert other.is_set()
    owner.clear()
    assert not other.is_set()
    other.close()
    owner.close()
    import os

    assert not os.path.exists(owner.path)


def test_exit_codes_name_the_signal():
    assert describe_exit(-9) == "exit code -9 (killed by SIGKILL)"
    assert describe_exit(3) == "exit code 3"


def test_weight_size_comes_from_the_safetensors_header_and_picks_the_placement(tiny_models_root):
    from safetensors.torch import load_file

    from vramwise.parallel.placement import choose_placement, denoiser_bytes

    folder = tiny_models_root / "tiny-wan21-i2v"
    tensors = [t for f in (folder / "transformer").glob("*.safetensors") for t in load_file(f).values()]
    size = denoiser_bytes(folder, ["transformer"])
    assert size == sum(t.numel() * t.element_size() for t in tensors) > 0
    assert denoiser_bytes(folder, ["transformer"], dtype_bytes=2) == 2 * sum(t.numel() for t in tensors)
    gib = 2**30
    assert choose_placement(30 * gib, [80 * gib, 80 * gib], 4 * gib) == "resident"
    assert choose_placement(30 * gib, [80 * gib, 24 * gib], 4 * gib) == "stream"  # one small GPU: all stream
    assert choose_placement(30 * gib, [], 0) == "stream"


def test_workers_that_cannot_load_the_model_give_a_clear_error_and_leave_no_process(tiny_models_root, tmp_path):
    import shutil

    import psutil

    from vramwise.families import detect_family
    from vramwise.parallel import ParallelWorkerError, launch_parallel

    folder = tmp_path / "broken-wan"
    shutil.copytree(tiny_models_root / "tiny-wan21-i2v", folder)
    weights = next((folder / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ParallelWorkerError) as e:
        launch_parallel(folder, detect_family(folder), 2, torch.bfloat16, torch.device("cpu"), device_type="cpu")
    message = str(e.value)
    assert "while loading the denoiser" in message and "raised" in message and "exit code" not in message
    assert "download them again" in message
    workers = [c for c in psutil.Process().children(recursive=True) if "vramwise.parallel.worker" in " ".join(c.cmdline())]
    assert workers == []
