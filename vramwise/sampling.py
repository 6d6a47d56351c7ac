"""One sampling run: patches attached, progress and cancel observed, memory given back whatever happens."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch

from .cancel_hooks import block_modules, cancel_hooks
from .device import release_memory
from .errors import SamplingError
from .families.base import GenerationRequest
from .handles import VramwiseLatent, VramwiseModel
from .memory.host_run import check_request_fits_host, host_oom_error, is_host_oom


class SamplingObserver(Protocol):
    """Receives progress; either method may raise to cancel the run (ComfyUI's interrupt does)."""

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None: ...

    def check_cancel(self) -> None: ...


class _NullObserver:
    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        pass

    def check_cancel(self) -> None:
        pass


@contextmanager
def observe_steps(pipe: Any, denoisers: list[torch.nn.Module], observer: SamplingObserver, total: int, patches=()) -> Iterator[None]:
    """Report each scheduler step and check for cancel before every denoiser call.

    Wrapping ``scheduler.step`` works for every pipeline, including those without a step callback (I2VGen-XL),
    and the denoiser pre-hook lets a cancel land within one model call rather than one whole step. Pre-hooks on
    the denoisers' repeated blocks and the VAE encoder's blocks (cancel_hooks) make it land within one block of a
    single huge forward or of encoding the conditioning video, which at large sizes each take minutes on a CPU.
    """
    from .offload.stream import repeated_blocks

    scheduler = pipe.scheduler
    original_step = scheduler.step
    done = 0

    def step(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        out = original_step(*args, **kwargs)
        done += 1
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        for patch in patches:
            patch.on_step(done, total)
        observer.on_step(min(done, total), total, latents)
        return out

    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        observer.check_cancel()

    scheduler.step = step
    handles = [m.register_forward_pre_hook(pre_hook) for m in denoisers]
    blocks = [b for d in denoisers for b in repeated_blocks(d)]
    encoder = getattr(getattr(pipe, "vae", None), "encoder", None)
    if isinstance(encoder, torch.nn.Module):
        blocks += block_modules(encoder)
    try:
        observer.check_cancel()
        for patch in patches:
            patch.on_step(0, total)
        with cancel_hooks(blocks, observer.check_cancel):
            yield
    finally:
        for h in handles:
            h.remove()
        if scheduler.__dict__.get("step") is step:
            del scheduler.step


def generate(
    model: VramwiseModel,
    request: GenerationRequest,
    observer: SamplingObserver | None = None,
) -> VramwiseLatent:
    """Sample latents for ``request``. The cached pipeline is left exactly as it was found."""
    observer = observer or _NullObserver()
    loaded = model.loaded
    family = loaded.family
    pipe = loaded.pipe
    # The CPU generator makes a seed give the same noise on every device; the global seed covers pipelines
    # that draw some noise without the generator (I2VGen-XL).
    generator = torch.Generator("cpu").manual_seed(request.seed)
    torch.manual_seed(request.seed)
    run = family.run_info(loaded, request)
    # Refuse up front what host RAM cannot hold (memory/host_run.py), before minutes of encoding and sampling.
    check_request_fits_host(loaded, request.width, request.height, request.num_frames, request.cfg > 1.0)
    detachers = []
    try:
        family.configure_scheduler(pipe, request)
        for patch in model.patches:
            detachers.append(patch.attach(model, run))
        with observe_steps(pipe, loaded.denoisers, observer, request.steps, model.patches):
            latents = family.sample(loaded, request, generator)
        latents = latents.detach().float().cpu()
    except RuntimeError as e:
        if is_host_oom(e):
            raise host_oom_error(e, request.width, request.height, request.num_frames) from e
        raise
    finally:
        for detach in reversed(detachers):
            detach()
        loaded.placement.release()
        release_memory(loaded.device)
    if not torch.isfinite(latents).all():
        raise SamplingError(
            "Sampling produced NaN/inf values. Fix: use weight_dtype bf16 (fp16 overflows in these models), "
            "lower cfg, or check that the model files are not corrupt."
        )
    return VramwiseLatent(
        samples=latents,
        family_id=family.id,
        width=request.width,
        height=request.height,
        num_frames=request.num_frames,
        fps=float(family.defaults.fps),
    )
