"""Token-merge speed and output change: Wan2.1-I2V-14B transformer and I2VGen-XL UNet, random weights.

One denoiser forward (one CFG half for Wan, the CFG batch of 2 for I2VGen-XL, as each pipeline calls it) per
timing, median of ``--repeats`` after a warm-up; "rel L2" is ||out - out_ratio0|| / ||out_ratio0||. Random
weights say nothing about visual quality: this measures speed and that the merge path runs at full size.

    python bench/token_merge_bench.py            # GPU: Wan 480x832x81, I2VGen-XL 512x512x16
    python bench/token_merge_bench.py --tiny     # CPU smoke test of the same code paths

Logs and a JSON of the rows go to $OUT (if set) or bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vramwise.token_merge.dit import DitMergeSettings, patch_dit  # noqa: E402
from vramwise.token_merge.attention import default_impl, size_grouped_attention  # noqa: E402
from vramwise.token_merge.pairing import plan_pairs  # noqa: E402
from vramwise.token_merge.unet import UnetMergeSettings, patch_unet  # noqa: E402

WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
WAN_TINY = dict(WAN_14B, num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=32,
                num_layers=4, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=32)
UNET_FULL: dict = {}  # diffusers' I2VGenXLUNet defaults are ali-vilab/i2vgen-xl's UNet config
UNET_TINY = dict(
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=4,
)

LOG: list[str] = []
OUT_DIR = Path(os.environ.get("OUT") or REPO / "bench" / "out")


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "token_merge_bench.log", "a") as f:  # streamed: a run cut short keeps its rows
        f.write(msg + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_random(model: torch.nn.Module, std: float = 0.02) -> None:
    """Linear/conv weights N(0, std), biases 0; norms and the models' own tables keep their defaults."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def build(cls, config: dict, device: torch.device, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the 14B model directly in bf16 (fp32 would need 66 GB)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    init_random(model)
    return model.to(device=device, dtype=dtype).eval()


def time_forward(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor, float]:
    with torch.no_grad():
        out = fn()  # warm-up (and compile, for flex)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), out, peak


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_wan(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from diffusers import WanTransformer3DModel

    cfg = WAN_TINY if args.tiny else WAN_14B
    t0 = time.perf_counter()
    model = build(WanTransformer3DModel, cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"Wan transformer built: {n_params / 1e9:.2f} B params in {time.perf_counter() - t0:.1f} s")
    rows = wan_rows(args, model, cfg, device, dtype, args.height, args.width, args.frames, variants=True)
    for size in args.also:
        h, w, f = (int(v) for v in size.split("x"))
        rows += wan_rows(args, model, cfg, device, dtype, h, w, f, variants=False, ratios=[0.5])
    return rows


def wan_rows(args, model, cfg: dict, device: torch.device, dtype: torch.dtype, height: int, width: int, frames: int,
             variants: bool, ratios: list[float] | None = None) -> list[dict]:
    ratios = args.ratios if ratios is None else ratios
    impls = args.impls if variants else [default_impl(device)]
    args = argparse.Namespace(**{**vars(args), "height": height, "width": width, "frames": frames, "ratios": ratios,
                                 "impls": impls})
    size = f"{height}x{width}x{frames}"
    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, cfg["in_channels"], lat_f, lat_h, lat_w, generator=g).to(device, dtype)
    enc = torch.randn(1, 512, cfg["text_dim"], generator=g).to(device, dtype)
    img = torch.randn(1, 257, cfg["image_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    tokens = lat_f * (lat_h // 2) * (lat_w // 2)
    log(f"Wan input: {args.height}x{args.width}x{args.frames} -> latent {lat_f}x{lat_h}x{lat_w}, {tokens} tokens")

    def forward():
        return model(x, t, enc, img, return_dict=False)[0]

    impl = default_impl(device)
    # Most important first: every implementation at 0.5, then the ratio sweep, then the window / skip variants.
    configs = [dict(label="ratio 0 (stock)", ratio=0.0)]
    configs += [dict(label=f"ratio 0.5, {i}", ratio=0.5, attention_impl=i) for i in args.impls]
    configs += [dict(label=f"ratio {r:g}, {impl}", ratio=r, attention_impl=impl) for r in args.ratios if r != 0.5]
    if variants and not args.no_variants:
        configs += [
            dict(label=f"ratio 0.5, {impl}, window spatial", ratio=0.5, window="spatial", attention_impl=impl),
            dict(label=f"ratio 0.5, {impl}, skip 2 first + 2 last blocks (node defaults)", ratio=0.5,
                 skip_first_blocks=2, skip_last_blocks=2, attention_impl=impl),
        ]
    rows, base = [], None
    for c in configs:
        label = c.pop("label")
        settings = DitMergeSettings(**{"window": "spatial+temporal", **c})
        handle = patch_dit(model, settings)
        try:
            sec, out, peak = time_forward(forward, device, args.repeats)
            row = dict(model="wan2.1-i2v-14b", size=size, label=label, seconds=sec, peak_gib=peak,
                       merged_calls=handle.state.calls)
            if base is None:
                base = (sec, out)
            row["speedup"] = base[0] / sec
            row["rel_l2"] = rel_l2(out, base[1])
            log(f"  {label}: {sec:.3f} s  x{row['speedup']:.2f}  rel L2 {row['rel_l2']:.4f}  peak {peak:.1f} GiB")
        except Exception as e:  # keep the rest of the run
            row = dict(model="wan2.1-i2v-14b", size=size, label=label, error=f"{type(e).__name__}: {e}"[:300])
            log(f"  {label}: FAILED {row['error']}")
            log(traceback.format_exc(limit=3))
        finally:
            handle.detach()
        rows.append(row)
    return rows


def reduce_variants(plan, x: torch.Tensor, timed) -> None:
    """Ways to average the members of each size-2 key of a plan, [B, N, C] -> [B, M, C] (timings only)."""
    b, n, c = x.shape
    flat = x.reshape(b * n, c)
    cols = plan._flat_ids(b, n)[-1]  # the size-2 group, [2, B * M]
    rows = cols.t().contiguous()
    ids = rows.flatten()
    variants = {
        "embedding_bag mean": lambda: torch.nn.functional.embedding_bag(rows, flat, mode="mean"),
        "index_select + view mean": lambda: flat.index_select(0, ids).view(-1, 2, c).mean(1),
        "two index_select + lerp (used)": lambda: torch.lerp(flat.index_select(0, cols[0]), flat.index_select(0, cols[1]), 0.5),
        "advanced index + mean": lambda: flat[rows].mean(1),
    }
    res = {name: timed(fn) for name, fn in variants.items()}
    log(f"  reduce of one {list(x.shape)} tensor at ratio 0.5 (size-2 keys only): " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in res.items()))


def plan_parts(k: torch.Tensor, grid, timed, device: torch.device) -> None:
    """Where a plan's time goes (ratio 0.5), alone and queued behind GEMMs (as inside a forward)."""
    from vramwise.token_merge.pairing import greedy_pairs

    metric = k.mean(dim=2)
    sim = torch.randn(1950, 8, 8, device=device)
    parts = {
        "metric k.mean(heads)": lambda: k.mean(dim=2),
        "plan from metric": lambda: plan_pairs(metric, grid, 0.5, "spatial+temporal"),
        "greedy_pairs 1950x8x8": lambda: greedy_pairs(sim),
    }
    alone = {name: timed(fn) for name, fn in parts.items()}
    line = ", ".join(f"{name} {ms:.2f} ms" for name, ms in alone.items())
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=k.dtype)
        busy = timed(lambda: [a @ a for _ in range(4)])
        queued = {name: timed(lambda fn=fn: ([a @ a for _ in range(4)], fn())) - busy for name, fn in parts.items()}
        line += "; behind 4 GEMMs (+ms): " + ", ".join(f"{name} +{ms:.2f}" for name, ms in queued.items())
    log("  plan parts: " + line)


def attention_breakdown(args, device: torch.device, dtype: torch.dtype) -> None:
    """One Wan 14B self-attention call at full size: stock kernel vs the merge plan, the reduce and the merged call."""
    heads, d = WAN_14B["num_attention_heads"], WAN_14B["attention_head_dim"]
    grid = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device="cpu").manual_seed(4)
    q, k, v = (torch.randn(1, n, heads, d, generator=g).to(device, dtype) for _ in range(3))

    def timed(fn, iters: int = 10) -> float:
        with torch.no_grad():
            fn()
            sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
        return (time.perf_counter() - t) / iters * 1000

    stock = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
    from vramwise.token_merge.attention import _sdpa_choice

    choice = {0: "math", 1: "flash", 2: "mem-efficient", 3: "cuDNN"}.get(
        _sdpa_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), d**-0.5), "?")
    log(f"Attention breakdown, one self-attention call, {n} tokens, {heads} heads x {d}: stock SDPA {stock:.2f} ms "
        f"(kernel SDPA picks: {choice})")
    if device.type == "cuda":
        flash = timed(lambda: torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=d**-0.5))
        log(f"  the flash kernel on the same call: {flash:.2f} ms")
    plan_parts(k, grid, timed, device)
    reduce_variants(plan_pairs(k.mean(dim=2), grid, 0.5, "spatial+temporal"), k.flatten(2), timed)
    for ratio in args.ratios:
        plan = plan_pairs(k.mean(dim=2), grid, ratio, "spatial+temporal")
        plan_ms = timed(lambda: plan_pairs(k.mean(dim=2), grid, ratio, "spatial+temporal"))
        reduce_ms = timed(lambda: (plan.reduce(k.flatten(2)), plan.reduce(v.flatten(2))))
        ks = [t.unflatten(2, (heads, d)).transpose(1, 2) for t in plan.reduce(k.flatten(2))]
        vs = [t.unflatten(2, (heads, d)).transpose(1, 2) for t in plan.reduce(v.flatten(2))]
        attn_ms = timed(lambda: size_grouped_attention(q.transpose(1, 2), ks, vs, plan.sizes, default_impl(device)))
        log(f"  ratio {ratio:g}: sizes {plan.sizes} keys {[t.shape[2] for t in ks]}; plan {plan_ms:.2f} ms, "
            f"reduce k+v {reduce_ms:.2f} ms, merged attention {attn_ms:.2f} ms; total "
            f"{plan_ms + reduce_ms + attn_ms:.2f} ms vs stock {stock:.2f} ms")


def bench_unet(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from diffusers import I2VGenXLUNet

    cfg = UNET_TINY if args.tiny else UNET_FULL
    model = build(I2VGenXLUNet, cfg, device, dtype)
    log(f"I2VGen-XL UNet built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")
    size = args.unet_size
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(2, 4, args.unet_frames, size // 8, size // 8, generator=g).to(device, dtype)
    cross = model.config.cross_attention_dim
    kwargs = dict(
        fps=torch.tensor([16, 16], device=device),
        image_latents=torch.randn(x.shape, generator=g).to(device, dtype),
        image_embeddings=torch.randn(2, cross, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(2, 77, cross, generator=g).to(device, dtype),
        return_dict=False,
    )
    t = torch.tensor([500, 500], device=device)

    def forward():
        torch.manual_seed(3)
        return model(x, t, **kwargs)[0]

    rows, base = [], None
    for ratio in [0.0, *args.ratios]:
        label = f"ratio {ratio:g}" + (" (stock)" if ratio == 0 else ", tomesd on spatial blocks")
        handle = patch_unet(model, UnetMergeSettings(ratio=ratio))
        try:
            sec, out, peak = time_forward(forward, device, args.repeats)
            if base is None:
                base = (sec, out)
            row = dict(model="i2vgen-xl", label=label, seconds=sec, peak_gib=peak, speedup=base[0] / sec,
                       rel_l2=rel_l2(out, base[1]), patched_blocks=len(handle.blocks))
            log(f"  {label}: {sec:.3f} s  x{row['speedup']:.2f}  rel L2 {row['rel_l2']:.4f}  peak {peak:.1f} GiB")
        except Exception as e:
            row = dict(model="i2vgen-xl", label=label, error=f"{type(e).__name__}: {e}"[:300])
            log(f"  {label}: FAILED {row['error']}")
        finally:
            handle.detach()
        rows.append(row)

    import tomesd

    label = "ratio 0.5, stock tomesd.apply_patch"
    try:
        tomesd.apply_patch(model, ratio=0.5)
        sec, out, peak = time_forward(forward, device, args.repeats)
        row = dict(model="i2vgen-xl", label=label, seconds=sec, peak_gib=peak, speedup=base[0] / sec,
                   rel_l2=rel_l2(out, base[1]))
        log(f"  {label}: {sec:.3f} s  x{row['speedup']:.2f}")
    except Exception as e:
        row = dict(model="i2vgen-xl", label=label, error=f"{type(e).__name__}: {e}"[:200])
        log(f"  {label}: FAILED {row['error']}")
    finally:
        tomesd.remove_patch(model)
    rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | s / forward | speed-up | rel L2 vs ratio 0 | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        model = r["model"] + (f" {r['size']}" if "size" in r else "")
        if "error" in r:
            lines.append(f"| {model} | {r['label']} | fails: {r['error']} | | | |")
        else:
            peak = "" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
            lines.append(
                f"| {model} | {r['label']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['rel_l2']:.4f} | {peak} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs and sizes (CPU smoke test)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--unet-size", type=int)
    p.add_argument("--unet-frames", type=int)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--impls", nargs="+", default=["groups", "bias"],
                   help="proportional-attention implementations compared at ratio 0.5 (the sweep uses the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--also", nargs="*", default=[], metavar="HxWxF",
                   help="further Wan sizes, stock vs ratio 0.5 only (e.g. 720x1280x81)")
    p.add_argument("--no-variants", action="store_true", help="skip the window / skipped-blocks rows")
    p.add_argument("--skip-wan", action="store_true")
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--breakdown-only", action="store_true", help="Wan: per-call attention breakdown, no forwards")
    args = p.parse_args(argv)
    small = args.tiny
    args.height = args.height or (64 if small else 480)
    args.width = args.width or (96 if small else 832)
    args.frames = args.frames or (9 if small else 81)
    args.unet_size = args.unet_size or (64 if small else 512)
    args.unet_frames = args.unet_frames or (4 if small else 16)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"token merge bench {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {name}; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}; command: python {' '.join(sys.argv)}")
    rows: list[dict] = []
    # The UNet part is short: run it first so a cut-short Wan part still leaves its rows.
    if not args.skip_unet:
        rows += bench_unet(args, device, dtype)
    if not args.skip_wan:
        attention_breakdown(args, device, dtype)
        if not args.breakdown_only:
            rows += bench_wan(args, device, dtype)
    text = table(rows)
    log("")
    log(f"Wan {args.height}x{args.width}x{args.frames}, I2VGen-XL {args.unet_size}x{args.unet_size}x{args.unet_frames}, "
        f"{device.type} {name}, bf16, median of {args.repeats}:")
    log(text)
    (OUT_DIR / "token_merge_bench.json").write_text(json.dumps(dict(device=name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
