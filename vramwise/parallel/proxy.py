"""The module that stands in for the denoiser inside the diffusers pipeline when it runs on several GPUs.

The pipeline keeps its own loop, scheduler, CFG and callbacks; only ``transformer(...)`` becomes a call to the
worker group. The proxy holds no weights: it answers what the pipeline reads of a transformer (``config``,
``dtype``, ``device``, ``cache_context``) and moves the output back to the pipeline's device.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch

from .group import WorkerGroup
from .support import check_tokens, video_tokens


class ParallelDenoiser(torch.nn.Module):
    """``pipe.transformer`` (or ``transformer_2``) backed by a ``WorkerGroup``."""

    def __init__(self, group: WorkerGroup, name: str, config: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.group = group
        self.name = name
        self.config = config
        self._dtype = dtype
        self._device = torch.device(device)
        # Called while the workers compute, so Cancel lands within a block instead of after a whole forward.
        self.cancel_check: Callable[[], None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def cache_context(self, name: str):
        # Step caches are not applied across ranks; the pipeline's cache contexts are accepted and ignored.
        return nullcontext()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict[str, Any] | None = None) -> Any:
        check_tokens(video_tokens(tuple(hidden_states.shape), tuple(self.config["patch_size"])), self.group.spec.ulysses_degree)
        kwargs: dict[str, Any] = dict(hidden_states=hidden_states, timestep=timestep,
                                      encoder_hidden_states=encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            kwargs["encoder_hidden_states_image"] = encoder_hidden_states_image
        if attention_kwargs:
            kwargs["attention_kwargs"] = attention_kwargs
        out = self.group.call(self.name, kwargs, cancel_check=self.cancel_check).to(self._device)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, ranks={self.group.spec.world_size}, device={self._device}"


@contextmanager
def cancel_checks(denoisers: Iterable[torch.nn.Module], check: Callable[[], None]) -> Iterator[None]:
    """Give every parallel proxy among ``denoisers`` the run's cancel check for the duration of a run."""
    proxies = [d for d in denoisers if isinstance(d, ParallelDenoiser)]
    for proxy in proxies:
        proxy.cancel_check = check
    try:
        yield
    finally:
        for proxy in proxies:
            proxy.cancel_check = None
