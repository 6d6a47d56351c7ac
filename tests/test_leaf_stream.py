"""The big-encoder leaf streamer: each leaf runs on the device, the host weights come back as they were, and the
streamer keeps no reference to them (so a released text encoder frees its RAM). On a CPU-only machine the
'device' is the CPU: the streamer copies anyway, so a leaf running on its copy is visible by data pointer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vramwise.offload.leaf_stream import stream_leaves

CPU = torch.device("cpu")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.shared.weight  # tied, as UMT5's token embedding is
        self.register_buffer("scale", torch.ones(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.shared(ids)))


def test_each_leaf_runs_on_the_device_and_the_host_weights_come_back_unchanged():
    m = Tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    want = m(ids)
    before = {n: p.data_ptr() for n, p in m.named_parameters(remove_duplicate=False)}
    seen = {}
    streamer = stream_leaves(m, CPU)
    for name in ("shared", "proj", "head"):
        getattr(m, name).register_forward_pre_hook(
            lambda mod, args, _n=name: seen.__setitem__(_n, {p.data_ptr() for p in mod.parameters()}))
    out = m(ids)
    assert torch.equal(out, want)
    for name in ("shared", "proj", "head"):  # each leaf ran on its copy, not on the host tensors
        assert not seen[name] & set(before.values()), name
    assert {n: p.data_ptr() for n, p in m.named_parameters(remove_duplicate=False)} == before
    assert m.head.weight is m.shared.weight
    streamer.remove()
    assert torch.equal(m(ids), want)


def test_the_streamer_holds_no_reference_to_the_host_weights():
    m = Tiny()
    stream_leaves(m, CPU)
    m(torch.zeros(1, 2, dtype=torch.long))
    host = weakref.ref(m.proj.weight.data.untyped_storage())
    m.proj.weight.data = torch.empty(0)  # what encoder_weights.release does
    gc.collect()
    assert host() is None


def test_an_error_mid_forward_leaves_nothing_on_the_device_after_restore_all():
    m = Tiny()
    host = {n: p.data_ptr() for n, p in m.named_parameters()}
    streamer = stream_leaves(m, CPU)

    def boom(mod, args):
        raise RuntimeError("fails inside the encoder")

    m.proj.register_forward_pre_hook(boom)  # runs after the streamer's pre-hook: proj's weights are out
    with pytest.raises(RuntimeError, match="fails inside"):
        m(torch.zeros(1, 2, dtype=torch.long))
    assert m.proj.weight.data_ptr() != host["proj.weight"]
    streamer.restore_all()
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == host


def test_every_leaf_and_the_top_send_their_tensor_inputs_to_the_device():
    """UMT5 builds its relative-position buckets on the bias embedding's weight device (the host, before that
    leaf's weights move) and passes them in: each leaf's inputs must follow its weights. Seen with a 'meta'
    device, which a CPU-only machine has (no weights move in this module, it has none)."""
    streamer = stream_leaves(torch.nn.Module(), torch.device("meta"))
    args, kwargs = streamer._inputs_to_device(None, (torch.arange(3), 7), {"mask": torch.ones(2), "n": 1})
    assert args[0].device.type == "meta" and args[1] == 7
    assert kwargs["mask"].device.type == "meta" and kwargs["n"] == 1
    m = Tiny()
    stream_leaves(m, CPU)
    for leaf in (m, m.shared, m.proj, m.head):  # the pre-hooks that move inputs (they take kwargs)
        assert leaf._forward_pre_hooks_with_kwargs
