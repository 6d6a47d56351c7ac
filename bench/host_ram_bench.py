"""Host-RAM benchmark (issue #15): full-size random Wan2.1-I2V-14B written to disk as a diffusers folder, then one
fresh process per (host RAM budget, VRAM budget) case that loads it with ``offload_mode auto`` the way the loader
node does and runs the distill recipe (480x832x81, 4 steps, cfg 1: encode, steps, decode).

Per case it records the plan, the load time, the peak RSS of the load and of the whole case (VmHWM: pinned
buffers, pageable weights, the CUDA context and the libraries all count), the pinned bytes, the VRAM peak, the
encode / steps / decode split and the step time. The first case is also run a second time in the same process
(prompt embeddings cached, text encoder released) to show what a re-run holds. A budget counts as held only when
VmHWM is within it.

    python3 bench/host_ram_bench.py --out $OUT                       # GPU, full size (writes ~46 GB to --folder)
    python3 bench/host_ram_bench.py --tiny --out /tmp/hr              # CPU, tiny model: checks the script itself

A VRAM budget is a smaller card emulated with ``torch.cuda.set_per_process_memory_fraction`` (plus the planner's
view of free memory), as ``bench/engine_gpu_checks.py budgets`` does; the host budget is the loader's
``host_ram_budget_gb`` input, the machine itself has more.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

GiB = 2**30


def log(msg: str) -> None:
    print(msg, flush=True)


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class RssTrace:
    """VmRSS sampled every 0.1 s in a thread, the peak kept per phase ("load", "run 1", "decode 1", ...), so the
    table can say which part of a case set its VmHWM."""

    def __init__(self) -> None:
        import threading

        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        gib = round(status_bytes("VmRSS") / GiB, 2)
        if gib > self.peaks.get(self.phase, 0.0):
            self.peaks[self.phase] = gib

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux)


# ---- the model on disk -------------------------------------------------------------------------------------------
def write_model(args) -> None:
    import torch

    folder = Path(args.folder)
    if (folder / "model_index.json").is_file():
        log(f"model folder {folder} exists: reused")
        return
    t0 = time.time()
    if args.model == "a14b":
        pipe = build_a14b(args)
    elif args.tiny:
        import tiny_models

        pipe = tiny_models._wan_i2v_pipeline(flf2v=False)
    else:
        from engine_gpu_checks import build_full_pipeline

        pipe = build_full_pipeline(args.layers)
    if args.disk_fp8:
        to_disk_fp8(pipe)
    t1 = time.time()
    pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    log(f"built in {t1 - t0:.0f}s, wrote {size / 1e9:.1f} GB to {folder} in {time.time() - t1:.0f}s")
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_a14b(args):
    """Wan2.2 I2V A14B: two 14B experts (no image branch), UMT5-XXL, the Wan2.1 VAE, no CLIP (random weights)."""
    import torch
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    if args.tiny:
        import tiny_models

        experts = [tiny_models._wan_transformer(t, in_channels=36, out_channels=16, with_image=False)
                   for t in ("wan22-a14b-high", "wan22-a14b-low")]
        tok = tiny_models._umt5_tokenizer()
        te, vae = tiny_models._umt5_encoder(len(tok)), tiny_models._wan21_vae()
        sched = tiny_models._unipc_flow(tiny_models.WAN22_FLOW_SHIFT)
    else:
        from engine_gpu_checks import build_full_pipeline, randomize
        from offload_bench import wan_config

        base = build_full_pipeline(1)  # for its full-size text encoder, VAE, tokenizer and scheduler
        cfg = {k: v for k, v in wan_config(args.layers).items() if k not in ("image_dim", "added_kv_proj_dim")}
        experts = []
        for _ in range(2):
            with torch.device("cuda"):
                m = WanTransformer3DModel(**cfg).to(torch.bfloat16).eval()
            randomize(m)
            experts.append(m.to("cpu"))
        torch.cuda.empty_cache()
        tok, te, vae, sched = base.tokenizer, base.text_encoder, base.vae, base.scheduler
        del base
    return WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, image_processor=None,
                                   image_encoder=None, transformer=experts[0], transformer_2=experts[1],
                                   boundary_ratio=0.9)


def to_disk_fp8(pipe) -> None:
    """Store the denoisers' fp8-storage layers as float8_e4m3fn on disk (as the fp8 checkpoints users download
    are): halves the files, and reads straight into the fp8 buffers."""
    import torch

    from vramwise.precision import DENOISER_FP8_SKIP
    from vramwise.weight_loading import fp8_storage_names

    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        names = fp8_storage_names(model, DENOISER_FP8_SKIP)
        for n, p in model.named_parameters():
            if n in names:
                p.data = p.data.to(torch.float8_e4m3fn)


# ---- one case, in its own process --------------------------------------------------------------------------------
def pinned_bytes(loaded) -> int:
    total = 0
    for engine in loaded.placement.stream_engines:
        for layout in list(engine.layouts) + list(engine.transient_layouts):
            host = getattr(layout, "host", None)
            if host is not None and host.is_pinned():
                total += host.numel() * host.element_size()
    return total


def child(args) -> None:
    import torch

    from engine_gpu_checks import _ftfy_stand_in, emulate_card
    from lora_bench import StepTimer

    from vramwise.decode import TilingOptions, decode_latents
    from vramwise.families.base import GenerationRequest
    from vramwise.handles import VramwiseModel
    from vramwise.image_prep import ResizeMode, fit_image
    from vramwise.loader import LoadOptions, PipelineCache
    from vramwise.memory.planned_run import generate_with_plan
    from vramwise.offload import OffloadMode
    from vramwise.offload import stream as stream_mod
    from vramwise.precision import WeightDtype

    host_gb, vram_gb = args.case
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    stream_mod.SETTINGS.compile_blocks = False  # the same eager step in every case (compiling costs ~1 min each)
    _ftfy_stand_in()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.ones(1, device=device)  # the CUDA context is part of the baseline, as in a ComfyUI process
        if vram_gb:
            emulate_card(vram_gb)
    gc.collect()
    row = dict(host_budget_gib=host_gb, vram_budget_gib=vram_gb, mode=args.mode,
               base_rss_gib=round(status_bytes("VmRSS") / GiB, 2))
    reset_peak_rss()
    trace = RssTrace()
    row["rss_peaks_gib"] = trace.peaks  # the same dict, filled as the case goes
    trace.enter("load")
    cache = PipelineCache()
    opts = LoadOptions(Path(args.folder), OffloadMode(args.mode), WeightDtype.BF16, host_ram_budget_gb=host_gb)
    t0 = time.perf_counter()
    try:
        loaded, _ = cache.get_or_load("bench", opts, device)
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        row.update(ok=False, stage="load", error=f"{type(e).__name__}: {str(e)[:500]}",
                   peak_rss_gib=round(status_bytes("VmHWM") / GiB, 2))
        print("RESULT " + json.dumps(row), flush=True)
        return
    row.update(load_s=round(time.perf_counter() - t0, 1), load_peak_rss_gib=round(status_bytes("VmHWM") / GiB, 2),
               loaded_rss_gib=round(status_bytes("VmRSS") / GiB, 2), pinned_gib=round(pinned_bytes(loaded) / GiB, 2),
               plan=loaded.placement.describe().splitlines()[:3], notes=loaded.notes[-4:])
    model = VramwiseModel(loaded)
    g = torch.Generator().manual_seed(0)
    image = fit_image(torch.rand(args.height, args.width, 3, generator=g), args.width, args.height, ResizeMode.CROP)
    req = GenerationRequest(image=image, prompt="a red ball rolls across a table", negative_prompt="",
                            width=args.width, height=args.height, num_frames=args.frames, steps=args.steps, cfg=1.0,
                            seed=0, shift=5.0)
    runs = []
    for rep in range(args.runs):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(device)
        timer.watch(loaded.denoisers)
        trace.enter(f"run {rep + 1}")
        t1 = time.perf_counter()
        try:
            latent, report = generate_with_plan(model, req, timer, vram_budget_gb=vram_gb, headroom_gb=0.0,
                                                cache=cache)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, stage=f"run {rep + 1}", error=f"{type(e).__name__}: {str(e)[:500]}",
                       peak_rss_gib=round(status_bytes("VmHWM") / GiB, 2))
            print("RESULT " + json.dumps(row), flush=True)
            return
        finally:
            timer.unwatch()
        split = timer.split()
        t2 = time.perf_counter()
        trace.enter(f"decode {rep + 1}")
        frames, _ = decode_latents(model, latent, TilingOptions())
        timer.sync()
        split.update(decode_s=round(time.perf_counter() - t2, 2), run_s=round(time.perf_counter() - t1, 1),
                     peak_vram_gib=round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else 0.0,
                     rss_after_gib=round(status_bytes("VmRSS") / GiB, 2), finite=bool(torch.isfinite(frames).all()),
                     report=report[-2:])
        del frames, latent
        trace.enter("after")
        runs.append(split)
        print("PARTIAL " + json.dumps(dict(row, runs=runs, peak_rss_gib=round(status_bytes("VmHWM") / GiB, 2))),
              flush=True)
    steps = [s for r in runs for s in r["step_s"]]
    row.update(ok=True, runs=runs, step_median_s=round(statistics.median(steps), 3),
               peak_rss_gib=round(status_bytes("VmHWM") / GiB, 2),
               pinned_after_gib=round(pinned_bytes(loaded) / GiB, 2) if not loaded.released else None)
    from vramwise.encoder_weights import ENCODER_WEIGHTS

    row["text_encoder_reads"] = dict(leaf_by_leaf=ENCODER_WEIGHTS.streamed, whole=ENCODER_WEIGHTS.reloads,
                                     leaf_read_s=round(ENCODER_WEIGHTS.streamed_read_s, 2))
    shared = getattr(loaded.placement, "expert_host", None)
    if shared is not None:  # the one-expert plan: what re-reading an expert's blocks cost
        row["expert_swaps_s"] = [round(x, 2) for x in shared.swaps]
    row["within_budget"] = bool(not host_gb or row["peak_rss_gib"] <= host_gb)
    print("RESULT " + json.dumps(row), flush=True)


# ---- the parent: cases one after the other, a table last ---------------------------------------------------------
def parse_cases(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        h, v = part.split(":")
        out.append((float(h), float(v)))
    return out


def table(rows: list[dict], ref_step: float | None) -> str:
    lines = ["| host budget | VRAM budget | plan | load s | load peak RSS | peak RSS (VmHWM) | pinned | VRAM peak | "
             "encode / steps / decode s | step s (x ref) | held | RSS peak by phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = f"{r['host_budget_gib']:g} GiB" if r["host_budget_gib"] else "-"
        phases = " / ".join(f"{k} {g}" for k, g in (r.get("rss_peaks_gib") or {}).items() if k != "start")
        v = f"{r['vram_budget_gib']:g} GiB" if r["vram_budget_gib"] else "-"
        if not r.get("ok"):
            lines.append(f"| {h} | {v} | {r.get('stage', '?')} failed: {r.get('error', '')[:160]} | | | "
                         f"{r.get('peak_rss_gib', '')} | | | | | no | {phases} |")
            continue
        plan = r["plan"][0].removeprefix("plan: ").split(";")[0] if r["plan"] else "?"
        first = r["runs"][0]
        ratio = f" ({r['step_median_s'] / ref_step:.2f}x)" if ref_step else ""
        lines.append(
            f"| {h} | {v} | {plan} | {r['load_s']} | {r['load_peak_rss_gib']} | {r['peak_rss_gib']} | "
            f"{r['pinned_gib']} | {first['peak_vram_gib']} | {first['encode_s']} / {first['steps_s']} / "
            f"{first['decode_s']} | {r['step_median_s']}{ratio} | {'yes' if r['within_budget'] else 'NO'} | {phases} |")
    return "\n".join(lines)


def parent(args) -> None:
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_model(args)
    args.budget_s -= int(time.time() - start)
    rows: list[dict] = []
    cases = [("stream", (0.0, 0.0))] if args.reference else []
    cases += [("auto", c) for c in parse_cases(args.cases)]
    deadline = time.time() + args.budget_s
    for i, (mode, (h, v)) in enumerate(cases):
        if time.time() + args.case_timeout > deadline:
            log(f"== case {mode} host {h:g} GiB, VRAM {v:g} GiB: skipped (--budget-s {args.budget_s} would be passed)")
            continue
        cmd = [sys.executable, "-u", __file__, "--child", f"{h}:{v}", "--mode", mode, "--folder", args.folder,
               "--frames", str(args.frames), "--steps", str(args.steps), "--width", str(args.width),
               "--height", str(args.height), "--runs", str(2 if i == 0 else 1)] + (["--tiny"] if args.tiny else [])
        log(f"== case {mode} host {h:g} GiB, VRAM {v:g} GiB")
        t0 = time.time()
        with open(out / "host_ram_cases.log", "a") as logf:
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=logf, text=True,
                                      timeout=args.case_timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
                stdout, code = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:  # keep what the case measured before its time ran out
                stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                code = f"killed after {args.case_timeout} s"
        got = [json.loads(l[7:]) for l in stdout.splitlines() if l.startswith("RESULT ")]
        if not got:
            partial = [json.loads(l[8:]) for l in stdout.splitlines() if l.startswith("PARTIAL ")]
            if partial:
                last = partial[-1]
                steps = [x for r in last["runs"] for x in r["step_s"]]
                last.update(ok=True, partial=str(code), step_median_s=round(statistics.median(steps), 3),
                            within_budget=bool(last["peak_rss_gib"] <= h) if h else True)
                got = [last]
        if not got:
            got = [dict(host_budget_gib=h, vram_budget_gib=v, mode=mode, ok=False, stage="process",
                        error=f"exit {code}, no result (see host_ram_cases.log)")]
        for r in got:
            r["wall_s"] = round(time.time() - t0, 1)
            log("RESULT " + json.dumps(r))
            rows.append(r)
        with open(out / "host_ram.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    # the unconstrained stream step: the plain 'stream' case, else the roomiest case that planned stream bf16
    ref = next((r for r in rows if r.get("ok") and r["mode"] == "stream"), None) or next(
        (r for r in sorted(rows, key=lambda r: -r["host_budget_gib"])
         if r.get("ok") and r["plan"] and r["plan"][0].startswith("plan: stream, bf16")), None)
    log(table(rows, ref["step_median_s"] if ref else None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--folder", default="/tmp/wan21-i2v-14b-random")
    ap.add_argument("--out", default="/tmp/host_ram_bench")
    ap.add_argument("--cases", default="32:8,64:16,24:8,32:16,64:8,24:16", help="host GiB:VRAM GiB, ...")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="first a plain 'stream' case with no budget: the unconstrained stream step")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--case-timeout", type=int, default=150, help="a case not started this long before the end "
                    "of --budget-s is skipped; one running longer is killed")
    ap.add_argument("--budget-s", type=int, default=560, help="wall seconds for the whole script (the model "
                    "write included)")
    ap.add_argument("--child", type=lambda s: tuple(float(x) for x in s.split(":")), dest="case")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--model", choices=("wan21", "a14b"), default="wan21")
    ap.add_argument("--disk-fp8", action="store_true", help="write the denoisers' big layers as fp8 (A14B in bf16 "
                    "is 57 GB of experts: with the text encoder more than the device's 64 GiB disk)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    if args.tiny:
        args.width, args.height, args.frames, args.steps = 64, 64, 5, 2
    if args.case is not None:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
