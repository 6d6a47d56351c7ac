"""The sampler's scheduler choice and Wan2.2 A14B's per-expert cfg and switch point, on tiny models."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import load_tiny, tiny_wan_request
from vramwise.errors import InputError
from vramwise.families.schedulers import SCHEDULERS
from vramwise.sampling import generate


@pytest.fixture(scope="module")
def wan21(tiny_models_root):
    return load_tiny(tiny_models_root / "tiny-wan21-i2v")


@pytest.fixture(scope="module")
def a14b(tiny_models_root):
    return load_tiny(tiny_models_root / "tiny-wan22-i2v-a14b")


def test_each_scheduler_samples_differently_and_default_comes_back(wan21):
    out = {}
    for name in SCHEDULERS:
        out[name] = generate(wan21, tiny_wan_request(steps=3, cfg=1.0, scheduler=name)).samples
        assert torch.isfinite(out[name]).all()
    assert type(wan21.loaded.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # lcm ran last
    again = generate(wan21, tiny_wan_request(steps=3, cfg=1.0)).samples
    assert type(wan21.loaded.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert torch.equal(again, out["default"])
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(out[a], out[b]), (a, b)


def test_lcm_is_reproducible_with_the_seed(wan21):
    a = generate(wan21, tiny_wan_request(steps=3, cfg=1.0, scheduler="lcm", seed=4)).samples
    b = generate(wan21, tiny_wan_request(steps=3, cfg=1.0, scheduler="lcm", seed=4)).samples
    assert torch.equal(a, b)


def test_flow_euler_uses_the_shift(wan21):
    a = generate(wan21, tiny_wan_request(steps=3, cfg=1.0, scheduler="flow_euler", shift=1.0)).samples
    b = generate(wan21, tiny_wan_request(steps=3, cfg=1.0, scheduler="flow_euler", shift=8.0)).samples
    assert not torch.equal(a, b)


def test_a14b_low_noise_cfg_and_boundary(a14b):
    req = dict(steps=4, cfg=3.5)
    base = generate(a14b, tiny_wan_request(**req)).samples
    same = generate(a14b, tiny_wan_request(**req, cfg_low_noise=3.5)).samples
    low1 = generate(a14b, tiny_wan_request(**req, cfg_low_noise=1.0)).samples
    assert torch.equal(base, same)
    assert not torch.equal(base, low1)
    late = generate(a14b, tiny_wan_request(**req, boundary=0.5)).samples
    assert not torch.equal(base, late)
    assert a14b.loaded.pipe.config.boundary_ratio == 0.9  # the loaded switch point is put back


def test_a14b_low_noise_cfg_above_one_needs_cfg_above_one(a14b):
    with pytest.raises(InputError, match="cfg_low_noise"):
        generate(a14b, tiny_wan_request(cfg=1.0, cfg_low_noise=3.0))


def test_flow_schedulers_are_refused_for_other_families():
    from vramwise.families.i2vgenxl import I2VGenXL

    with pytest.raises(InputError, match="scheduler"):
        I2VGenXL().configure_scheduler(None, tiny_wan_request(scheduler="flow_euler"))
