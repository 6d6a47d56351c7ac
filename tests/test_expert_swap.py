"""Wan2.2 A14B under the one-expert plan: the second expert's blocks are never read at load, both experts stream
from one set of host buffers, and a swap re-reads an expert's blocks from its files so the output is the same as
with both experts held (on the tiny A14B model, CPU)."""

from __future__ import annotations

import pytest
import torch

from vramwise.handles import VramwiseModel
from vramwise.loader import LoadOptions, load_pipeline
from vramwise.memory import planner
from vramwise.offload import OffloadMode
from vramwise.precision import WeightDtype
from vramwise.sampling import generate

from engine_helpers import Recorder, tiny_wan_request

GiB = 2**30
NAMES = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def folder(tiny_models_root):
    return tiny_models_root / "tiny-wan22-i2v-a14b"


def _budgets(folder) -> dict[str, float]:
    comp = planner.components_from_folder(folder, NAMES)
    host = {p: planner.estimate(p, comp, planner.DEFAULT_RUN).host_bytes for p in planner.PLANS if comp.allows(p)}
    one = host[planner.Plan("stream", fp8=True, one_expert=True)]
    both = host[planner.Plan("stream", fp8=True)]
    bf16 = host[planner.Plan("stream")]
    assert one < both < bf16
    return {"one expert": (one + both) / 2 / GiB, "both experts": (both + bf16) / 2 / GiB}


def _load(folder, budget_gb: float):
    opts = LoadOptions(folder, OffloadMode.AUTO, WeightDtype.BF16, host_ram_budget_gb=budget_gb)
    return load_pipeline(opts, torch.device("cpu"))


def _reads(monkeypatch) -> list[tuple[str, str]]:
    from vramwise import weight_loading

    reads, real = [], weight_loading.read_tensor
    monkeypatch.setattr(weight_loading, "read_tensor",
                        lambda f, st, dtype: reads.append((f.name, st.name)) or real(f, st, dtype))
    return reads


def test_a_budget_only_one_pinned_expert_fits_leaves_the_second_experts_blocks_unread(folder, monkeypatch):
    reads = _reads(monkeypatch)
    loaded = _load(folder, _budgets(folder)["one expert"])
    assert loaded.placement.plan.plan == planner.Plan("stream", fp8=True, one_expert=True)
    second = [n for f, n in reads if "/transformer_2/" in f]
    assert second and not any(n.startswith("blocks.") for n in second)  # its embedders yes, its blocks no
    assert any(n.startswith("blocks.") for f, n in reads if "/transformer/" in f)
    a, b = (loaded.pipe.transformer.blocks[0].ffn.net[2], loaded.pipe.transformer_2.blocks[0].ffn.net[2])
    assert a.weight.data_ptr() == b.weight.data_ptr()  # one buffer, two experts
    assert "one expert pinned at a time" in loaded.placement.describe()


def test_one_pinned_expert_gives_the_output_of_both_held_and_swaps_at_the_boundary(folder):
    req = tiny_wan_request(steps=4, cfg=1.0)
    held = VramwiseModel(_load(folder, _budgets(folder)["both experts"]))
    assert held.loaded.placement.plan.plan == planner.Plan("stream", fp8=True)
    want = generate(held, req, Recorder()).samples
    swapped = VramwiseModel(_load(folder, _budgets(folder)["one expert"]))
    host = swapped.loaded.placement.expert_host
    first = generate(swapped, req, Recorder()).samples
    assert len(host.swaps) == 1  # high-noise expert packed at load, low-noise read at the boundary
    again = generate(swapped, req, Recorder()).samples
    assert len(host.swaps) == 3  # back to the high-noise expert, then the low-noise one again
    assert torch.equal(first, want) and torch.equal(again, want)
    assert "re-reads" in swapped.loaded.placement.describe()


def test_the_refusal_for_a14b_names_the_one_expert_figure(folder):
    comp = planner.components_from_folder(folder, NAMES)
    one = planner.estimate(planner.Plan("stream", fp8=True, one_expert=True), comp, planner.DEFAULT_RUN).host_bytes
    text = planner.host_refusal(comp, planner.DEFAULT_RUN, one // 2)
    assert f"~{one / GiB:.1f} GiB with one expert pinned at a time" in text
