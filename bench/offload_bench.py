"""Offload engine benchmark: Wan2.1-I2V-14B transformer (random bf16 weights) per offload mode, one CFG step each.

One step = both CFG passes (our modes: the CfgBatcher turns the pipeline's two calls into one batch-2 forward;
``group`` is the product's group mode as the pipeline runs it: two forwards; plain diffusers and ComfyUI: one
batch-2 forward). Each group of modes runs in its own process (the model is built in it) so offload hooks and
pinned copies of one mode never leak into the next. Prints one JSON line per result and a table at the end.

    python3 bench/offload_bench.py --frames 81,33 --out $OUT          # full
    python3 bench/offload_bench.py --layers 4 --frames 33 --quick      # environment check

ComfyUI's own model needs its ``comfy`` package on PYTHONPATH (e.g. .carry with comfy/, node_helpers.py,
folder_paths.py copied from a ComfyUI checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GROUPS = {
    "ours": ["none", "stream", "stream+fp8"],
    "ours_compiled": ["none+compile", "stream+compile", "stream+fp8+compile"],
    "group": ["group"],
    "diffusers": ["diffusers leaf+stream"],
    "comfy": ["comfy all-on-GPU", "comfy 4GiB budget"],
}
W, H = 832, 480


def log(msg: str) -> None:
    print(msg, flush=True)


def wan_config(layers: int) -> dict:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
    )


def randomize(model, std: float = 0.02) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, std)


def inputs(frames: int, device, dtype):
    import torch

    g = torch.Generator("cpu").manual_seed(frames)
    lf = (frames - 1) // 4 + 1
    x = torch.randn(1, 36, lf, H // 8, W // 8, generator=g).to(device, dtype)
    t = torch.tensor([700.0], device=device)
    ctx = torch.randn(1, 512, 4096, generator=g).to(device, dtype) * 0.1
    neg = torch.randn(1, 512, 4096, generator=g).to(device, dtype) * 0.1
    img = torch.randn(1, 257, 1280, generator=g).to(device, dtype) * 0.1
    return x, t, ctx, neg, img


def timed(step, n: int, warm: int):
    import torch

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def compile_blocks(blocks) -> None:
    """Regional compilation of each block's own forward; the stream hooks stay outside the compiled code."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for b in blocks:
        b.forward = torch.compile(b.forward, fullgraph=True, dynamic=False)


def run_group(group: str, args) -> list[dict]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    dt = torch.bfloat16
    frames = [int(f) for f in args.frames.split(",")]
    results = []
    n, warm = (1, 1) if args.quick else (args.repeat, 1)

    def record(mode, f, step_s, peak, extra=None):
        r = dict(mode=mode, frames=f, s_per_step=round(step_s, 3), peak_gib=round(peak / 2**30, 2),
                 layers=args.layers, **(extra or {}))
        log("RESULT " + json.dumps(r))
        results.append(r)

    if group in ("ours", "ours_compiled", "group", "diffusers"):
        from diffusers import WanTransformer3DModel

        from vramwise.offload.cfg_batching import CfgBatcher
        from vramwise.offload.stream import StreamOffload, StreamSettings

        t0 = time.time()
        with torch.device(dev):
            model = WanTransformer3DModel(**wan_config(args.layers)).to(dt).eval()
        randomize(model)
        log(f"[{group}] built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params in {time.time() - t0:.1f}s")
        compiled = group == "ours_compiled"
        if compiled and not args.skip_none:
            compile_blocks(model.blocks)
        torch.set_grad_enabled(False)

        def cfg_step_fn(f):
            x, t, ctx, neg, img = inputs(f, dev, dt)
            batcher = CfgBatcher(model)
            batcher.set_negative(neg)

            def step():
                c = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                          return_dict=False)[0]
                u = model(hidden_states=x, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
                          return_dict=False)[0]
                return u + 5.0 * (c - u)

            return step, batcher

        def measure(mode, f, extra=None):
            step, batcher = cfg_step_fn(f)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                s = timed(step, n, warm + (1 if compiled else 0))
                peak = torch.cuda.max_memory_allocated()
                extra = {k: (v() if callable(v) else v) for k, v in (extra or {}).items()}
                record(mode, f, s, peak, dict(extra, baseline_gib=round(base / 2**30, 2), cfg=dict(batcher.stats)))
            except Exception as e:  # noqa: BLE001
                log(f"RESULT_FAIL {mode} {f}: {type(e).__name__}: {str(e)[:300]}")
            finally:
                batcher.detach()
                torch.cuda.empty_cache()

        if group in ("ours", "ours_compiled"):
            suffix = "+compile" if compiled else ""
            if not args.skip_none:
                for f in frames:
                    measure("none" + suffix, f)
                if compiled:  # the stream engine compiles its own (lean) pieces
                    for b in model.blocks:
                        b.__dict__.pop("forward", None)
            model.to("cpu")
            torch.cuda.empty_cache()
            for fp8 in [v == "1" for v in args.fp8.split(",")]:
                t0 = time.time()
                eng = StreamOffload(model, dev, StreamSettings(
                    fp8_linear=fp8, ffn_chunk_tokens=args.ffn_chunk or None, depth=args.depth or None,
                    compile_blocks=compiled, lean=bool(args.lean), chunk_rows=args.chunk_rows or None))
                log(f"[{group}] packed fp8={fp8} in {time.time() - t0:.1f}s: {eng.describe()}")
                for f in frames:
                    measure(("stream+fp8" if fp8 else "stream") + suffix, f,
                            dict(depth=lambda: eng.depth, ratio=lambda: round(eng.measured_ratio or 0, 3)))
                    eng.release()
                eng.remove()
                torch.cuda.empty_cache()
        elif group == "group":
            from diffusers.hooks import apply_group_offloading

            model.to("cpu")
            torch.cuda.empty_cache()
            apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                   non_blocking=True)
            for f in frames:
                x, t, ctx, neg, img = inputs(f, dev, dt)

                def step():
                    c = model(x, t, ctx, img, return_dict=False)[0]
                    u = model(x, t, neg, img, return_dict=False)[0]
                    return u + 5.0 * (c - u)

                torch.cuda.reset_peak_memory_stats()
                try:
                    record("group (block, 2 forwards)", f, timed(step, n, warm), torch.cuda.max_memory_allocated())
                except Exception as e:  # noqa: BLE001
                    log(f"RESULT_FAIL group {f}: {type(e).__name__}: {str(e)[:300]}")
                torch.cuda.empty_cache()
        else:
            from diffusers.hooks import apply_group_offloading

            model.to("cpu")
            torch.cuda.empty_cache()
            apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True, non_blocking=True)
            for f in frames:
                x, t, ctx, neg, img = inputs(f, dev, dt)
                xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
                torch.cuda.reset_peak_memory_stats()
                try:
                    s = timed(lambda: model(xb, tb, cb, ib, return_dict=False)[0], n, warm)
                    record("diffusers group leaf+stream (batch 2)", f, s, torch.cuda.max_memory_allocated())
                except Exception as e:  # noqa: BLE001
                    log(f"RESULT_FAIL diffusers {f}: {type(e).__name__}: {str(e)[:300]}")
                torch.cuda.empty_cache()
    elif group == "comfy":
        sys.argv = [sys.argv[0]]
        import comfy.ldm.wan.model as wan
        import comfy.model_management as mm
        import comfy.model_patcher as mp
        import comfy.ops

        t0 = time.time()
        model = wan.WanModel(
            model_type="i2v", patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=5120, ffn_dim=13824, freq_dim=256,
            text_dim=4096, out_dim=16, num_heads=40, num_layers=args.layers, qk_norm=True, cross_attn_norm=True,
            eps=1e-6, device=dev, dtype=dt, operations=comfy.ops.manual_cast,
        ).eval()
        randomize(model)
        log(f"[comfy] built in {time.time() - t0:.1f}s")
        torch.set_grad_enabled(False)
        for f in frames:
            x, t, ctx, neg, img = inputs(f, dev, dt)
            xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
            torch.cuda.reset_peak_memory_stats()
            try:
                s = timed(lambda: model(xb, tb, cb, clip_fea=ib), n, warm)
                record("comfy all-on-GPU (batch 2)", f, s, torch.cuda.max_memory_allocated())
            except Exception as e:  # noqa: BLE001
                log(f"RESULT_FAIL comfy-gpu {f}: {type(e).__name__}: {str(e)[:300]}")
            del xb, cb
            torch.cuda.empty_cache()
        model.to("cpu")
        torch.cuda.empty_cache()
        patcher = mp.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
        patcher.load(dev, lowvram_model_memory=int(args.comfy_budget_gb * 2**30))
        log(f"[comfy] partially loaded, {torch.cuda.memory_allocated() / 2**30:.2f} GiB on GPU")
        for f in frames:
            x, t, ctx, neg, img = inputs(f, dev, dt)
            xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
            torch.cuda.reset_peak_memory_stats()
            try:
                s = timed(lambda: model(xb, tb, cb, clip_fea=ib), n, warm)
                record(f"comfy {args.comfy_budget_gb:g}GiB weights budget (batch 2)", f, s,
                       torch.cuda.max_memory_allocated())
            except Exception as e:  # noqa: BLE001
                log(f"RESULT_FAIL comfy-budget {f}: {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
    return results


def table(results: list[dict]) -> str:
    rows = ["| mode | frames | s/step | x all-on-GPU (diffusers) | x ComfyUI all-on-GPU | peak GiB |",
            "|---|---|---|---|---|---|"]
    base = {r["frames"]: r["s_per_step"] for r in results if r["mode"] == "none"}
    comfy = {r["frames"]: r["s_per_step"] for r in results if r["mode"].startswith("comfy all")}
    for r in sorted(results, key=lambda r: (-r["frames"], r["mode"])):
        f = r["frames"]
        a = f"{r['s_per_step'] / base[f]:.2f}" if f in base else "-"
        c = f"{r['s_per_step'] / comfy[f]:.2f}" if f in comfy else "-"
        rows.append(f"| {r['mode']} | {f} | {r['s_per_step']:.3f} | {a} | {c} | {r['peak_gib']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    global W, H
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", default="ours,group,diffusers,comfy")
    ap.add_argument("--frames", default="81,33")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--ffn-chunk", type=int, default=8192)
    ap.add_argument("--comfy-budget-gb", type=float, default=4.0)
    ap.add_argument("--only", default="")
    ap.add_argument("--skip-none", action="store_true", help="skip the all-on-GPU rows (ours)")
    ap.add_argument("--lean", type=int, default=1, help="stream: the lean chunked forward (1) or stock (0)")
    ap.add_argument("--chunk-rows", type=int, default=0, help="lean forward chunk, batch x tokens rows")
    ap.add_argument("--fp8", default="0,1", help="stream variants to run: 0 = bf16, 1 = fp8 storage")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--size", default="832x480", help="video width x height, e.g. 1280x720")
    args = ap.parse_args()
    W, H = (int(v) for v in args.size.lower().split("x"))
    if args.only:
        run_group(args.only, args)
        return
    results: list[dict] = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for group in args.groups.split(","):
        cmd = [sys.executable, __file__, "--only", group, "--frames", args.frames, "--layers", str(args.layers),
               "--repeat", str(args.repeat), "--depth", str(args.depth), "--ffn-chunk", str(args.ffn_chunk),
               "--comfy-budget-gb", str(args.comfy_budget_gb), "--lean", str(args.lean), "--chunk-rows",
               str(args.chunk_rows), "--fp8", args.fp8, "--size", args.size] + (["--quick"] if args.quick else [])
        cmd += ["--skip-none"] if args.skip_none else []
        t0 = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with open(Path(args.out) / f"bench_{group}.log", "w") as fh:
            fh.write(proc.stdout)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
            elif line.startswith(("RESULT_FAIL", "[")):
                log(line)
        log(f"group {group}: rc {proc.returncode}, {time.time() - t0:.0f}s")
        if proc.returncode:
            log("\n".join(proc.stdout.splitlines()[-15:]))
    with open(Path(args.out) / "results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    log(table(results))


if __name__ == "__main__":
    main()
