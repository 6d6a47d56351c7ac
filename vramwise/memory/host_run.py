"""Host RAM a run needs, estimated from its size before anything is allocated, and a refusal naming what to shrink.

The planner estimates VRAM; this is the same idea for host memory, which every run uses whatever the device:
the conditioning video the pipeline builds for the VAE encoder, the latents, the decoded frames (float32 on the
host, the IMAGE format) and, when the compute device is the CPU, the activations and the VAE's work too. Without
it a CPU run of 4096x4096x81 grows for minutes (the VAE encoding 81 full-size frames) before it dies, and a long
clip fails with the allocator's raw message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InputError
from .estimates import DenoiserShape, activation_bytes, tokens

# Share of MemAvailable a run may plan to use: the rest absorbs allocator slack and what the estimate misses.
HOST_SHARE = 0.9
# Latent-sized float32 tensors alive during sampling (latents, noise prediction(s), condition latents, the
# scheduler's copies), counted at the denoiser's input channel count (Wan I2V: 16 noise + 20 condition).
LATENT_COPIES = 6
# Bytes per pixel value of the conditioning video the pipelines build for their VAE encoder (float32, then a
# copy in the VAE's 16-bit dtype).
CONDITION_BYTES_PER_VALUE = 4 + 2
# Bytes per pixel value while a decode turns the VAE's 16-bit output into float32 0..1 frames: the output, two
# float32 temporaries overlapping and the contiguous float32 frames. Measured on the tiny Wan2.1 model on a CPU
# (peak RSS above the loaded model, 1 step, untiled): 512x512x33 +0.58 GB and 256x256x161 +0.46 GB for the whole
# run; the estimate with 12 bytes: 0.58 and 0.45 GB (with 10 it was 7-9% under); HOST_SHARE takes the rest.
DECODE_BYTES_PER_VALUE = 2 + 4 + 4 + 2


@dataclass(frozen=True)
class HostRunEstimate:
    """Peak host bytes of each phase of a run."""

    encode: int
    denoise: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.encode, self.denoise, self.decode)

    def describe(self) -> str:
        gib = 2**30
        return (f"~{self.peak / gib:.1f} GiB (encode {self.encode / gib:.1f}, denoise {self.denoise / gib:.1f}, "
                f"decode {self.decode / gib:.1f})")


@dataclass(frozen=True)
class RunSize:
    """What the estimate needs of a model: the VAE compression, the denoiser's shape, the VAE's work per pixel."""

    spatial: int
    temporal: int
    latent_channels: int
    denoisers: tuple[DenoiserShape, ...]
    vae_bytes_per_pixel: float
    compute_on_host: bool

    @classmethod
    def of(cls, loaded: Any) -> "RunSize":
        from .planner import components_of

        family, pipe = loaded.family, loaded.pipe
        s, t = family.latent_factors(pipe)
        comp = components_of(pipe, family.denoiser_names)
        channels = 16
        for name in family.denoiser_names:
            config = dict(getattr(getattr(pipe, name, None), "config", {}) or {})
            channels = max(channels, int(config.get("in_channels") or 0))
        return cls(int(s), int(t), channels, tuple(comp.denoisers), float(family.decode_bytes_per_pixel(loaded)),
                   loaded.device.type == "cpu")


def estimate_host_run(size: RunSize, width: int, height: int, num_frames: int, do_cfg: bool,
                      vae_tile: int | None = None) -> HostRunEstimate:
    """Peak host bytes per phase for one run; ``vae_tile`` (pixels) when the decode is tiled."""
    values = num_frames * height * width * 3
    lf, lh, lw = (num_frames - 1) // size.temporal + 1, height // size.spatial, width // size.spatial
    latents = LATENT_COPIES * size.latent_channels * lf * lh * lw * 4
    vae_pixels = min(vae_tile, height) * min(vae_tile, width) if vae_tile else height * width
    vae_work = int(size.vae_bytes_per_pixel * vae_pixels) if size.compute_on_host else 0
    activations = 0
    if size.compute_on_host:
        batch = 2 if do_cfg else 1  # the stream engine batches both CFG passes
        activations = max((activation_bytes(tokens(lf, lh, lw, d.patch), d.hidden, batch) for d in size.denoisers),
                          default=0)
    return HostRunEstimate(
        encode=values * CONDITION_BYTES_PER_VALUE + vae_work + latents,
        denoise=latents + activations,
        decode=values * DECODE_BYTES_PER_VALUE + vae_work,
    )


def _largest(fits: Callable[[int], bool], candidates: list[int]) -> int | None:
    """The largest candidate (ascending list) that fits; estimates grow with every input, so bisect."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def check_host_run(size: RunSize, family: Any, width: int, height: int, num_frames: int, do_cfg: bool,
                   available: int, vae_tile: int | None = None, decode_only: bool = False) -> HostRunEstimate:
    """The estimate, or an InputError naming width/height/num_frames with sizes that would fit ``available``.

    The sampler checks every phase (a run whose frames cannot be held is refused before minutes of sampling);
    the decoder checks the decode alone (``decode_only``).
    """
    budget = int(available * HOST_SHARE)

    def peak_of(e: HostRunEstimate) -> int:
        return e.decode if decode_only else e.peak

    def peak(w: int, h: int, f: int) -> int:
        return peak_of(estimate_host_run(size, w, h, f, do_cfg, vae_tile))

    est = estimate_host_run(size, width, height, num_frames, do_cfg, vae_tile)
    if peak_of(est) <= budget:
        return est
    phase = "decoding" if decode_only else "sampling and decoding"
    m, tf = int(family.size_multiple), int(family.temporal_factor)
    frames = [f for f in range(1, num_frames, tf) if family.frames_valid(f)]
    max_frames = _largest(lambda f: peak(width, height, f) <= budget, frames)
    def scaled(k: int) -> tuple[int, int]:  # k multiples of m on the longer side, the aspect kept
        if width >= height:
            return k * m, max(1, round(height * k / width)) * m
        return max(1, round(width * k / height)) * m, k * m

    ks = [k for k in range(1, max(width, height) // m + 1) if scaled(k)[0] <= width and scaled(k)[1] <= height]
    k = _largest(lambda k: peak(*scaled(k), num_frames) <= budget, ks)
    fixes = []
    if max_frames is not None:
        fixes.append(f"num_frames {max_frames} or fewer at {width}x{height}")
    if k is not None:
        w, h = scaled(k)
        fixes.append(f"{w}x{h} or smaller at {num_frames} frames")
    fix = "use " + (" or ".join(fixes) if fixes else "a smaller width, height and num_frames") + \
        " (or free host memory: close other programs)."
    raise InputError(
        "width/height/num_frames",
        f"{width}x{height}x{num_frames} needs {est.describe()} of host RAM for {phase}, but only "
        f"{available / 2**30:.1f} GiB is available.",
        fix,
    )


def is_host_oom(exc: BaseException) -> bool:
    """True for the CPU allocator's out-of-memory error (torch raises it as a plain RuntimeError)."""
    # torch 2.13 CPU: RuntimeError "[enforce fail at alloc_cpu.cpp:127] ... DefaultCPUAllocator: can't allocate
    # memory: you tried to allocate N bytes"; older builds say "not enough memory". CUDA OOMs are the planner's.
    if not isinstance(exc, RuntimeError) or "CUDA" in str(exc):
        return False
    text = str(exc)
    return "DefaultCPUAllocator" in text or "can't allocate memory" in text or "not enough memory" in text


def host_oom_error(exc: BaseException, width: int, height: int, num_frames: int) -> InputError:
    """The allocator's failure said as an input error (the estimate let it through; the machine had less)."""
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return InputError(
        "width/height/num_frames",
        f"{width}x{height}x{num_frames} ran out of host memory ({first}).",
        "use fewer num_frames or a smaller width/height, or free host memory (close other programs).",
    )


def check_request_fits_host(loaded: Any, width: int, height: int, num_frames: int, do_cfg: bool,
                            vae_tile: int | None = None, decode_only: bool = False) -> HostRunEstimate:
    """``check_host_run`` for a loaded model against what the kernel reports available now."""
    from ..device import host_available_bytes

    return check_host_run(RunSize.of(loaded), loaded.family, width, height, num_frames, do_cfg,
                          host_available_bytes(), vae_tile, decode_only)
