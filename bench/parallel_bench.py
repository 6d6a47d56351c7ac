"""Several GPUs for one Wan2.1-I2V-14B denoiser (random bf16 weights): one CFG step, 1 vs N GPUs, resident and
streamed ranks, through the pack's worker group (vramwise/parallel) exactly as the sampler would drive it.

One step = both CFG passes = two proxy calls (cond, uncond), each a forward split across the ranks by diffusers'
Ulysses context parallelism. The 1-GPU rows run through a one-rank group, so the transport cost (~20 MB of
tensors per call through the CPU) is in both. Peak VRAM is per rank (max over the measured calls); host memory
is the summed PSS of this process and the workers (memory-mapped weights shared between ranks count once).
Prints one JSON line per result and a table last.

    python bench/parallel_bench.py --gpus 1,2 --out $OUT                     # 2-GPU machine, both sizes
    python bench/parallel_bench.py --gpus 1,2,4 --placements resident --out $OUT
    python bench/parallel_bench.py --cpu-gloo --tiny                         # CPU check (gloo, tiny Wan)

The 14B transformer is written once as safetensors under --model-dir (32.8 GB; the workers memory-map it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "scripts"))

FULL_SIZES = "832x480x81,1280x720x81"
TINY_SIZES = "64x64x5,96x64x9"
IMAGE_TOKENS = 257  # CLIP ViT-H/14 tokens of Wan2.1 I2V


def log(msg: str) -> None:
    print(msg, flush=True)


def pss_bytes() -> int:
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def model_folder(args) -> Path:
    """A folder with ``transformer/`` (the tiny Wan, or the 14B architecture with random weights)."""
    if args.tiny:
        import tiny_models

        return tiny_models.build_all(Path(args.model_dir) / "tiny", only=["tiny-wan21-i2v"])["tiny-wan21-i2v"]
    folder = Path(args.model_dir) / f"wan21-i2v-14b-random-{args.layers}l"
    if not (folder / "transformer" / "config.json").is_file():
        import torch
        from diffusers import WanTransformer3DModel
        from offload_bench import randomize, wan_config

        log(f"writing random {args.layers}-layer Wan 14B transformer to {folder}")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an fp32 build would need 65 GB of RAM
        try:
            model = WanTransformer3DModel(**wan_config(args.layers))
        finally:
            torch.set_default_dtype(previous)
        randomize(model)
        model.save_pretrained(folder / "transformer", safe_serialization=True)
        del model
    return folder


def inputs(config: dict, width: int, height: int, frames: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    lf = (frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(1, config["in_channels"], lf, height // 8, width // 8, generator=g).bfloat16(),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, config["text_dim"], generator=g).bfloat16(),
        encoder_hidden_states_image=(torch.randn(1, IMAGE_TOKENS, config["image_dim"], generator=g).bfloat16()
                                     if config.get("image_dim") else None),
    )


def run_case(folder: Path, n: int, placement: str, sizes: list[tuple[int, int, int]], args) -> list[dict]:
    import torch

    from vramwise.families.wan import Wan21I2V
    from vramwise.parallel import launch_parallel

    device_type = "cpu" if args.cpu_gloo else "cuda"
    device = torch.device("cpu" if args.cpu_gloo else "cuda:0")
    rows = []
    t0 = time.perf_counter()
    try:
        par = launch_parallel(folder, Wan21I2V(), n, torch.bfloat16, device, placement=placement,
                              device_type=device_type, attention_backend=args.attention or None)
    except Exception as e:  # noqa: BLE001 - a case that cannot start is a result too
        return [dict(gpus=n, placement=placement, size=f"{w}x{h}x{f}", error=f"{type(e).__name__}: {e}"[:300])
                for w, h, f in sizes]
    start_s = time.perf_counter() - t0
    proxy = par.proxies["transformer"]
    try:
        for w, h, f in sizes:
            row = dict(gpus=n, placement=placement, size=f"{w}x{h}x{f}", start_s=round(start_s, 1),
                       backend=par.group.attention_backend, device=device_type)
            try:
                cond = inputs(proxy.config, w, h, f, 0)
                uncond = dict(cond, encoder_hidden_states=inputs(proxy.config, w, h, f, 1)["encoder_hidden_states"])
                peaks: dict[int, int] = {}
                host = 0
                times = []
                for i in range(args.warmup + args.repeat):
                    t = time.perf_counter()
                    for kw in (cond, uncond):  # one CFG step, as the pipeline calls it
                        proxy(**{k: v for k, v in kw.items() if v is not None}, return_dict=False)
                        for rank, s in par.group.last_stats.items():
                            peaks[rank] = max(peaks.get(rank, 0), s.get("peak_gpu_bytes", 0))
                        host = max(host, pss_bytes() + sum(s.get("pss_bytes", 0)
                                                           for s in par.group.last_stats.values()))
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
                row.update(s_per_step=round(statistics.median(times), 3),
                           peak_gib_per_gpu=[round(peaks[r] / 2**30, 2) for r in sorted(peaks)],
                           host_pss_gib=round(host / 2**30, 2))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at the larger size; keep measuring
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            par.release()
            log(json.dumps(row))
            rows.append(row)
    finally:
        par.shutdown()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| size | GPUs | ranks hold | s / CFG step | speed-up | peak GiB per GPU | host PSS GiB |",
           "|---|---|---|---|---|---|---|"]
    base = {(r["size"], r["placement"]): r.get("s_per_step") for r in rows if r["gpus"] == 1}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | {r['gpus']} | {r['placement']} | {r['error'][:60]} | | | |")
            continue
        b = base.get((r["size"], r["placement"]))
        speed = f"{b / r['s_per_step']:.2f}x" if b and r["s_per_step"] else ""
        peaks = " / ".join(f"{p:.2f}" for p in r["peak_gib_per_gpu"])
        out.append(f"| {r['size']} | {r['gpus']} | {r['placement']} | {r['s_per_step']:.3f} | {speed} | {peaks} | "
                   f"{r['host_pss_gib']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="1,2", help="rank counts to compare, e.g. 1,2,4")
    ap.add_argument("--sizes", default="", help=f"WxHxF list (default {FULL_SIZES}; --tiny: {TINY_SIZES})")
    ap.add_argument("--placements", default="resident,stream")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention", default="", help="diffusers attention backend (default: the active one)")
    ap.add_argument("--cpu-gloo", action="store_true", help="ranks are CPU processes talking gloo")
    ap.add_argument("--tiny", action="store_true", help="the tiny random Wan (scripts/tiny_models.py)")
    ap.add_argument("--model-dir", default=os.environ.get("VRAMWISE_BENCH_MODELS", str(REPO / "bench" / "out")))
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "out")))
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in (args.sizes or (TINY_SIZES if args.tiny else FULL_SIZES)).split(",")]
    folder = model_folder(args)
    rows = []
    for placement in args.placements.split(","):
        for n in (int(x) for x in args.gpus.split(",")):
            rows += run_case(folder, n, placement, sizes, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "parallel_bench.json").write_text(json.dumps(rows, indent=1))
    log("")
    log(table(rows))


if __name__ == "__main__":
    main()
