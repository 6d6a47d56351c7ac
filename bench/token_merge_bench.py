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
from vramwise.token_merge.matching import default_impl  # noqa: E402
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
    # Most important first: every implementation at 0.5, then the ratio sweeps, then the window / skip variants.
    configs = [dict(label="ratio 0 (stock)", ratio=0.0)]
    configs += [dict(label=f"ratio 0.5, {i}", ratio=0.5, attention_impl=i) for i in args.impls]
    sweep = [i for i in args.impls if i != "mask"]
    configs += [dict(label=f"ratio {r:g}, {i}", ratio=r, attention_impl=i) for i in sweep for r in args.ratios if r != 0.5]
    if not args.no_variants:
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
            row = dict(model="wan2.1-i2v-14b", label=label, seconds=sec, peak_gib=peak,
                       merged_calls=handle.state.calls)
            if base is None:
                base = (sec, out)
            row["speedup"] = base[0] / sec
            row["rel_l2"] = rel_l2(out, base[1])
            log(f"  {label}: {sec:.3f} s  x{row['speedup']:.2f}  rel L2 {row['rel_l2']:.4f}  peak {peak:.1f} GiB")
        except Exception as e:  # keep the rest of the run
            row = dict(model="wan2.1-i2v-14b", label=label, error=f"{type(e).__name__}: {e}"[:300])
            log(f"  {label}: FAILED {row['error']}")
            log(traceback.format_exc(limit=3))
        finally:
            handle.detach()
        rows.append(row)
    return rows


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
        if "error" in r:
            lines.append(f"| {r['model']} | {r['label']} | fails: {r['error']} | | | |")
        else:
            peak = "" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
            lines.append(
                f"| {r['model']} | {r['label']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['rel_l2']:.4f} | {peak} |"
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
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--impls", nargs="+", default=["cudnn", "groups", "fold", "flex", "mask"],
                   help="proportional-attention implementations compared (mask only at ratio 0.5)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-variants", action="store_true", help="skip the window / skipped-blocks rows")
    p.add_argument("--skip-wan", action="store_true")
    p.add_argument("--skip-unet", action="store_true")
    args = p.parse_args(argv)
    small = args.tiny
    args.height = args.height or (64 if small else 480)
    args.width = args.width or (96 if small else 832)
    args.frames = args.frames or (9 if small else 81)
    args.unet_size = args.unet_size or (64 if small else 512)
    args.unet_frames = args.unet_frames or (4 if small else 16)
    if not torch.cuda.is_available():  # cudnn is CUDA-only; flex compiles slowly on CPU
        args.impls = [i for i in args.impls if i not in ("cudnn", "flex")]
    if not args.impls:
        p.error("no attention implementation left to compare on this device")

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
