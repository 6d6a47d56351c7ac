"""Where the streamed compiled step loses to a compiled resident one (issue #14): one GPU, one call.

Wan2.1-I2V-14B transformer, random bf16 weights, 480x832, one step = both CFG passes as one batch-2 forward.
Groups, each in its own process (the model is built in it):
  ours   the stream engine + compile, lean chunk rows swept (batch x tokens rows per chunk), the stock block
         forward compiled and streamed (no lean chunking), and a torch.profiler table of one step per setting
  comfy  ComfyUI's native WanModel resident, eager and with each block wrapped in torch.compile
Prints RESULT json lines and a table last; profiler tables go to $OUT.

    python3 bench/stream_speed_bench.py --out $OUT
    python3 bench/stream_speed_bench.py --layers 4 --frames 33 --chunks 4096 --quick   # environment check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from offload_bench import compile_blocks, inputs, log, randomize, timed, wan_config  # noqa: E402


def profile_table(step, path: Path, rows: int = 25) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows))


def run_ours(args) -> list[dict]:
    import torch
    from diffusers import WanTransformer3DModel

    from vramwise.offload.cfg_batching import CfgBatcher
    from vramwise.offload.stream import StreamOffload, StreamSettings

    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.set_grad_enabled(False)
    out = []
    with torch.device(dev):
        model = WanTransformer3DModel(**wan_config(args.layers)).to(dt).eval()
    randomize(model)
    model.to("cpu")
    torch.cuda.empty_cache()
    frames = [int(f) for f in args.frames.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    n, warm = (1, 2) if args.quick else (args.repeat, 2)

    def measure(label, eng, f, profile_name=None):
        x, t, ctx, neg, img = inputs(f, dev, dt)
        batcher = CfgBatcher(model)
        batcher.set_negative(neg)

        def step():
            c = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                      return_dict=False)[0]
            u = model(hidden_states=x, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
                      return_dict=False)[0]
            return u + 5.0 * (c - u)

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            s = timed(step, n, warm)
            peak = torch.cuda.max_memory_allocated()
            if profile_name and args.out:
                profile_table(step, Path(args.out) / profile_name)
            r = dict(group="ours", mode=label, frames=f, s_per_step=round(s, 3), peak_gib=round(peak / 2**30, 2))
            log("RESULT " + json.dumps(r))
            out.append(r)
        except Exception as e:  # noqa: BLE001
            log(f"RESULT_FAIL {label} {f}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            batcher.detach()
            eng.release()
            torch.cuda.empty_cache()

    t0 = time.time()
    eng = StreamOffload(model, dev, StreamSettings(compile_blocks=True, lean=True, ffn_chunk_tokens=None))
    log(f"[ours] packed in {time.time() - t0:.1f}s: {eng.describe()}")
    for f in frames:
        for c in chunks:
            eng.lean.chunk_rows = c
            measure(f"stream+compile lean chunk {c}", eng, f, f"profile_lean_{c}_{f}.txt" if c == chunks[0] else None)
    eng.remove()
    torch.cuda.empty_cache()
    if not args.quick:
        eng = StreamOffload(model, dev, StreamSettings(compile_blocks=True, lean=False, ffn_chunk_tokens=None))
        for f in frames:
            measure("stream+compile stock block (no lean)", eng, f, f"profile_stock_{f}.txt")
        eng.remove()
    return out


def run_comfy(args) -> list[dict]:
    sys.argv = [sys.argv[0]]
    import comfy.ldm.wan.model as wan
    import comfy.ops
    import torch

    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.set_grad_enabled(False)
    out = []
    model = wan.WanModel(
        model_type="i2v", patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=5120, ffn_dim=13824, freq_dim=256,
        text_dim=4096, out_dim=16, num_heads=40, num_layers=args.layers, qk_norm=True, cross_attn_norm=True,
        eps=1e-6, device=dev, dtype=dt, operations=comfy.ops.manual_cast,
    ).eval()
    randomize(model)
    frames = [int(f) for f in args.frames.split(",")]
    n = 1 if args.quick else args.repeat
    for label, warm in (("comfy resident eager", 1), ("comfy resident blocks compiled", 2)):
        if "compiled" in label:
            compile_blocks(model.blocks)
        for f in frames:
            x, t, ctx, neg, img = inputs(f, dev, dt)
            xb, tb, cb, ib = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, neg]), torch.cat([img, img])
            torch.cuda.reset_peak_memory_stats()
            try:
                s = timed(lambda: model(xb, tb, cb, clip_fea=ib), n, warm)
                r = dict(group="comfy", mode=label, frames=f, s_per_step=round(s, 3),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                log("RESULT " + json.dumps(r))
                out.append(r)
                if "compiled" in label and args.out and f == frames[0]:
                    profile_table(lambda: model(xb, tb, cb, clip_fea=ib), Path(args.out) / f"profile_comfy_{f}.txt")
            except Exception as e:  # noqa: BLE001
                log(f"RESULT_FAIL {label} {f}: {type(e).__name__}: {str(e)[:300]}")
            del xb, cb
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", default="")
    ap.add_argument("--groups", default="ours,comfy")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--frames", default="81,33")
    ap.add_argument("--chunks", default="4096,16384,65536")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.group:
        res = run_ours(args) if args.group == "ours" else run_comfy(args)
        print("GROUP_JSON " + json.dumps(res), flush=True)
        return
    results = []
    for g in args.groups.split(","):
        cmd = [sys.executable, __file__, "--group", g, "--layers", str(args.layers), "--frames", args.frames,
               "--chunks", args.chunks, "--repeat", str(args.repeat), "--out", args.out] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-20000:])
        sys.stderr.write(proc.stderr[-4000:])
        for line in proc.stdout.splitlines():
            if line.startswith("GROUP_JSON "):
                results += json.loads(line[len("GROUP_JSON "):])
    if args.out:
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    best = {f: min((r["s_per_step"] for r in results if r["mode"] == "comfy resident blocks compiled" and r["frames"] == f), default=None)
            for f in {r["frames"] for r in results}}
    print("| group | mode | frames | s/step | x comfy compiled | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        b = best.get(r["frames"])
        ratio = f"{r['s_per_step'] / b:.3f}" if b else "-"
        print(f"| {r['group']} | {r['mode']} | {r['frames']} | {r['s_per_step']:.3f} | {ratio} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
