"""Step-cache mechanics on the Wan2.1-I2V-14B transformer (random bf16 weights) under ``stream`` offload.

What it measures (random weights say nothing about which steps a real model would skip, so the schedule is fixed):
- the cost of a skipped step relative to a computed one (target <= 3%): a skipped step runs no block, streams
  no weight and only rebuilds both CFG outputs from the cached residuals;
- a whole run of ``--steps`` (40) with the ``fixed`` schedule that computes every other step (50% skipped)
  against the same run uncached (target <= 0.55x).

The denoising loop is a plain flow-matching Euler loop over the real transformer, called the way the Wan
pipeline calls it (cond then uncond with the same latents and timestep), through the stream engine, the CFG
batcher and the step cache's wrapper, exactly as the sampler stacks them. One step = both CFG passes.

    python bench/step_cache_bench.py                 # GPU: 480x832x81, 40 steps, stream (+ compile when Triton)
    python bench/step_cache_bench.py --tiny          # CPU smoke test of the same code path (tiny config)

Logs and a JSON of the results go to $OUT (if set) or bench/out/; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vramwise.offload.cfg_batching import CfgBatcher  # noqa: E402
from vramwise.offload.compile import compile_available  # noqa: E402
from vramwise.offload.stream import StreamOffload, StreamSettings  # noqa: E402
from vramwise.step_cache import CacheRun  # noqa: E402
from vramwise.step_cache.fixed import FixedRule  # noqa: E402

WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
WAN_TINY = dict(WAN_14B, num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=32,
                num_layers=4, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=32)
OUT_DIR = Path(os.environ.get("OUT") or REPO / "bench" / "out")
LOG_NAME = "step_cache_bench.log"


def log(msg: str) -> None:
    print(msg, flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / LOG_NAME, "a") as f:  # streamed: a run cut short keeps its lines
        f.write(msg + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: dict, device: torch.device) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (fp32 would need 66 GB at 14B)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to("cpu")  # stream keeps the blocks in (pinned) host memory


def inputs(config: dict, frames: int, height: int, width: int, device: torch.device):
    g = torch.Generator("cpu").manual_seed(0)
    lf = (frames - 1) // 4 + 1
    bf = torch.bfloat16
    latents = torch.randn(1, config["out_channels"], lf, height // 8, width // 8, generator=g).to(device)
    cond = torch.randn(1, config["in_channels"] - config["out_channels"], lf, height // 8, width // 8,
                       generator=g).to(device, bf)
    ctx = (torch.randn(1, 512, config["text_dim"], generator=g) * 0.1).to(device, bf)
    neg = (torch.randn(1, 512, config["text_dim"], generator=g) * 0.1).to(device, bf)
    img = (torch.randn(1, 257, config["image_dim"], generator=g) * 0.1).to(device, bf)
    return latents, cond, ctx, neg, img


def sample(model, batcher, data, steps: int, device, cache: bool, guidance: float = 5.0, shift: float = 3.0):
    """One run of ``steps`` Euler steps; returns (per-step seconds, computed flags, final latents)."""
    latents, cond, ctx, neg, img = data
    batcher.reset()
    batcher.set_negative(neg)
    run = CacheRun([("transformer", model)], FixedRule, steps, 0.0, 1.0, 1) if cache else None
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # Wan's flow shift
    x = latents.clone()
    times = []
    try:
        for i in range(steps):
            if run is not None:
                run.on_step(i, steps)
            sync(device)
            t0 = time.perf_counter()
            t = (sigmas[i] * 1000).reshape(1).to(device)
            hs = torch.cat([x.to(torch.bfloat16), cond], dim=1)
            c = model(hidden_states=hs, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                      return_dict=False)[0]
            u = model(hidden_states=hs, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
                      return_dict=False)[0]
            v = u.float() + guidance * (c.float() - u.float())
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            sync(device)
            times.append(time.perf_counter() - t0)
        skipped = set(run.log["transformer"][1]) if run is not None else set()
    finally:
        if run is not None:
            run.detach()
    return times, [i not in skipped for i in range(steps)], x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script works)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x480", help="width x height")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    if args.tiny:
        args.frames, args.size, args.steps = 5, "64x64", min(args.steps, 8)
    width, height = (int(v) for v in args.size.lower().split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = WAN_TINY if args.tiny else WAN_14B
    compiled = device.type == "cuda" and (args.compile == "on" or (args.compile == "auto" and compile_available()))
    torch.set_grad_enabled(False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    (OUT_DIR / LOG_NAME).unlink(missing_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"step cache bench {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {gpu}, torch {torch.__version__}")
    log(f"command: python {' '.join(sys.argv)}")

    t0 = time.time()
    build_device = device if device.type == "cuda" else torch.device("cpu")
    model = build(config, build_device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The product's settings (lean chunked forward, measured prefetch depth), compile as chosen.
    engine = StreamOffload(model, device, StreamSettings(compile_blocks=compiled))
    batcher = CfgBatcher(model)
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params in {time.time() - t0:.0f}s; "
        f"{engine.describe()}; compile {compiled}")
    data = inputs(config, args.frames, height, width, device)
    try:
        # Warm-up: compiles the blocks and lets the engine measure its prefetch depth (takes effect next run).
        warm, _, _ = sample(model, batcher, data, 2, device, cache=False)
        log(f"warm-up steps: {', '.join(f'{s:.3f}' for s in warm)} s; prefetch depth {engine.depth}")
        # The sampler releases the engine after every run; the next run activates it with the measured depth.
        engine.release()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        plain_times, _, plain_x = sample(model, batcher, data, args.steps, device, cache=False)
        peak_plain = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        log("uncached step s: " + " ".join(f"{s:.3f}" for s in plain_times))
        engine.release()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cached_times, computed, cached_x = sample(model, batcher, data, args.steps, device, cache=True)
        peak_cached = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        log("cached step s:   " + " ".join(f"{s:.3f}{'' if c else '*'}" for s, c in zip(cached_times, computed))
            + "   (* = skipped)")
        batch_stats = dict(batcher.stats)
    finally:
        batcher.detach()
        engine.release()
        engine.remove()

    comp = [s for s, c in zip(cached_times, computed) if c]
    skip = [s for s, c in zip(cached_times, computed) if not c]
    computed_med = statistics.median(comp)
    skipped_med = statistics.median(skip) if skip else float("nan")
    plain_total, cached_total = sum(plain_times), sum(cached_times)
    rel = float((cached_x - plain_x).norm() / plain_x.norm())
    result = dict(
        device=gpu, steps=args.steps, frames=args.frames, size=f"{width}x{height}", compiled=compiled,
        layers=config["num_layers"], computed_steps=len(comp), skipped_steps=len(skip),
        computed_step_s=round(computed_med, 4), skipped_step_s=round(skipped_med, 5),
        skipped_over_computed=round(skipped_med / computed_med, 4),
        uncached_run_s=round(plain_total, 2), cached_run_s=round(cached_total, 2),
        run_ratio=round(cached_total / plain_total, 4), uncached_step_s=round(statistics.median(plain_times), 4),
        peak_gib_uncached=round(peak_plain, 2), peak_gib_cached=round(peak_cached, 2),
        rel_l2_vs_uncached=round(rel, 4), cfg_batcher=batch_stats,
    )
    log("RESULT " + json.dumps(result))
    (OUT_DIR / "step_cache_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("computed step (median)", f"{computed_med:.3f} s", ""),
        ("skipped step (median)", f"{skipped_med * 1000:.1f} ms", f"{100 * skipped_med / computed_med:.2f}% of computed (target <= 3%)"),
        (f"{args.steps}-step run, uncached", f"{plain_total:.1f} s", f"peak {peak_plain:.2f} GiB"),
        (f"{args.steps}-step run, fixed 50% skipped", f"{cached_total:.1f} s",
         f"{cached_total / plain_total:.3f}x of uncached (target <= 0.55x), peak {peak_cached:.2f} GiB"),
    ]
    log("")
    label = "tiny Wan (CPU smoke test)" if args.tiny else "Wan 14B random bf16"
    log(f"| {label}, stream{' + compile' if compiled else ''}, {width}x{height}x{args.frames}, "
        f"{len(skip)}/{args.steps} skipped | time | note |")
    log("|---|---|---|")
    for name, value, note in rows:
        log(f"| {name} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
