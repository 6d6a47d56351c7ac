"""LoRA benchmark: full-size random Wan2.1-I2V-14B pipeline + a random rank-64 LoRA in the lightx2v key layout.

Measures, in one process (GPU), with the LoRA written to a real .safetensors file first:
- apply: reading + converting (diffusers' Wan conversion) + matching + attaching, seconds, and the peak RSS
  (VmHWM, reset before) above the RSS before: the target is <= +1 GiB (no second copy of the model);
- the ``stream`` step time with and without the LoRA (target <= 1.02x), at cfg 1 (the distill recipe);
- the whole 4-step cfg-1 run split into encode (prompt + image until the first denoiser call), steps, decode;
- optionally (``--comfy``, needs ComfyUI's ``comfy`` package on PYTHONPATH) ComfyUI's native WanModel with the
  same LoRA file through ``comfy.lora`` + ModelPatcher and ComfyUI's Wan VAE: time to patch, the RSS peak, and the
  same whole run split (VAE encode, steps, decode), resident and under a weights budget.

    python3 bench/lora_bench.py --out $OUT                  # GPU, full size
    python3 bench/lora_bench.py --tiny                      # CPU, tiny dims: checks the script itself

Prints one ``RESULT {json}`` line per measurement and a table last; logs go to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

GiB = 2**30
RESULTS: list[dict] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def result(**kw) -> None:
    RESULTS.append(kw)
    log("RESULT " + json.dumps(kw))


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        log(f"cannot reset VmHWM ({e}); the peak includes earlier phases")


def settle(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class StepTimer:
    """Observer: wall time of each step; ``watch`` marks the first denoiser call (the end of encoding)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.marks: list[float] = []
        self.first_call: float | None = None
        self._handles: list = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def watch(self, denoisers) -> None:
        def mark(module, args) -> None:
            if self.first_call is None:
                self.sync()
                self.first_call = time.perf_counter()

        self._handles = [d.register_forward_pre_hook(mark) for d in denoisers]

    def unwatch(self) -> None:
        for h in self._handles:
            h.remove()

    def on_step(self, step, total, latents) -> None:
        self.sync()
        self.marks.append(time.perf_counter())

    def check_cancel(self) -> None:
        pass

    def split(self) -> dict:
        enc_end = self.first_call or self.start
        steps = [b - a for a, b in zip([enc_end] + self.marks, self.marks)]
        return dict(encode_s=round(enc_end - self.start, 2), steps_s=round(sum(steps), 2),
                    step_s=[round(s, 3) for s in steps])


def build(args, device: torch.device):
    if args.tiny:
        import tiny_models

        pipe = tiny_models._wan_i2v_pipeline(flf2v=False)
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.to(torch.bfloat16)  # as family.load(torch_dtype=bf16) would give it
        return pipe
    from engine_gpu_checks import build_full_pipeline

    return build_full_pipeline(args.layers)


def request(args, cfg: float = 1.0):
    from vramwise.families.base import GenerationRequest
    from vramwise.image_prep import ResizeMode, fit_image

    g = torch.Generator().manual_seed(0)
    image = fit_image(torch.rand(args.height, args.width, 3, generator=g), args.width, args.height, ResizeMode.CROP)
    return GenerationRequest(image=image, prompt="a red ball rolls across a table", negative_prompt="",
                             width=args.width, height=args.height, num_frames=args.frames, steps=args.steps,
                             cfg=cfg, seed=0, shift=5.0, scheduler=args.scheduler)


def run_ours(args, device: torch.device, out: Path) -> None:
    import tiny_loras
    from engine_gpu_checks import MemSource, _ftfy_stand_in

    from vramwise.decode import TilingOptions, decode_latents
    from vramwise.handles import VramwiseModel
    from vramwise.loader import LoadOptions, load_pipeline
    from vramwise.lora import LoraEntry, convert, with_lora
    from vramwise.offload import OffloadMode
    from vramwise.offload import stream as stream_mod
    from vramwise.precision import WeightDtype
    from vramwise.sampling import generate

    _ftfy_stand_in()
    stream_mod.SETTINGS.compile_blocks = args.compile
    pipe = build(args, device)
    args.tcfg = dict(pipe.transformer.config)  # for ComfyUI's model of the same shape (--comfy)
    t0 = time.time()
    lora_path = tiny_loras.write_lora(pipe.transformer, out / f"lightx2v_random_rank{args.rank}.safetensors",
                                      "lightx2v", rank=args.rank, scale=args.lora_std)
    log(f"wrote {lora_path.name} ({lora_path.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.1f}s")
    for i, mode in enumerate(m for m in args.modes.split(",") if m):  # "" = only write the LoRA (--comfy alone)
        if i and args.tiny:
            pipe = build(args, device)  # tiny: a fresh pipeline per mode (the full one is unplaced instead)
        fp8 = mode.endswith("+fp8")
        offload = mode.removesuffix("+fp8")
        opts = LoadOptions(Path("wan21-i2v-14b-random"), OffloadMode(offload),
                           WeightDtype.FP8_E4M3FN if fp8 else WeightDtype.BF16, source=MemSource(pipe))
        t0 = time.time()
        loaded = load_pipeline(opts, device)
        log(f"[{mode}] placed in {time.time() - t0:.1f}s: " + "; ".join(loaded.notes[-2:]))
        model = VramwiseModel(loaded)

        # -- apply: read + convert + match + attach (what a LoRA node and the run's attach cost) --
        convert.clear_cache()
        settle(device)
        rss0 = rss_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        patched = with_lora(model, LoraEntry(lora_path, 1.0))
        lines = patched.patches[-1].validate(patched)
        from vramwise.families.wan import Wan21I2V

        run = Wan21I2V().run_info(loaded, request(args))
        detach = patched.patches[-1].attach(patched, run)
        apply_s = time.perf_counter() - t0
        peak = rss_bytes("VmHWM") - rss0
        detach()
        result(mode=mode, what="apply", seconds=round(apply_s, 2), rss_peak_above_gib=round(peak / GiB, 3),
               report=lines[:1])

        # -- whole runs, plain and with the LoRA (cfg 1, the distill recipe); the first run of each warms up --
        for label, m in (("plain", model), ("lora", patched)):
            for rep in range(args.repeat + 1):
                settle(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                timer = StepTimer(device)
                timer.watch(loaded.denoisers)
                try:
                    latent = generate(m, request(args), timer)
                finally:
                    timer.unwatch()
                split = timer.split()
                peak_vram = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else 0.0
                t1 = time.perf_counter()
                frames, _ = decode_latents(m, latent, TilingOptions())
                timer.sync()
                split["decode_s"] = round(time.perf_counter() - t1, 2)
                if rep == 0:
                    continue  # warm-up (and compile) run
                result(mode=mode, what=f"run {label}", rep=rep, peak_sample_gib=round(peak_vram, 2),
                       finite=bool(torch.isfinite(frames).all()),
                       report=[r for r in getattr(m.patches[-1], "report", [])][-1:] if m.patches else [], **split)
        # -- strength change: no reload, no re-read of the file, and (compiled) no new graphs --
        import torch._dynamo.utils as dyn

        graphs = dyn.counters["stats"]["unique_graphs"]
        reads = len(convert.READS)
        settle(device)
        t0 = time.perf_counter()
        generate(with_lora(model, LoraEntry(lora_path, 0.5)), request(args), StepTimer(device))
        result(mode=mode, what="strength change", seconds=round(time.perf_counter() - t0, 2),
               new_graphs=dyn.counters["stats"]["unique_graphs"] - graphs, file_reads=len(convert.READS) - reads,
               loads=loaded.options.source.loads)
        if device.type == "cuda":
            from engine_gpu_checks import unplace

            unplace(pipe, loaded.placement)


def comfy_dims(cfg: dict) -> dict:
    """ComfyUI WanModel arguments for the diffusers transformer config the LoRA was written for."""
    return dict(model_type="i2v", patch_size=tuple(cfg["patch_size"]), text_len=512, in_dim=cfg["in_channels"],
                dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], ffn_dim=cfg["ffn_dim"],
                freq_dim=cfg["freq_dim"], text_dim=cfg["text_dim"], out_dim=cfg["out_channels"],
                num_heads=cfg["num_attention_heads"], num_layers=cfg["num_layers"], qk_norm=True,
                cross_attn_norm=True, eps=1e-6)


def run_comfy(args, device: torch.device, out: Path) -> None:
    """ComfyUI's own Wan model and Wan2.1 VAE with the same LoRA file: comfy.lora key map + ModelPatcher patches,
    resident and under a weights budget, timed as a whole cfg-1 run (VAE encode of the conditioning video, the
    steps, VAE decode). ComfyUI's text and CLIP-vision encoders are not run (our encode figure includes both).

    Built and randomized on the GPU: on the CPU, building and filling 16 B parameters did not finish in 520 s
    on the H100 machine (2026-12-05)."""
    sys.argv = [sys.argv[0]] + (["--cpu"] if device.type == "cpu" else [])
    import comfy.options

    comfy.options.enable_args_parsing()  # so --cpu reaches comfy.cli_args (the tiny check on a CPU machine)
    import comfy.lora
    import comfy.ldm.wan.vae as wan_vae
    import comfy.model_patcher as mp
    import comfy.supported_models
    import comfy.utils

    from offload_bench import randomize

    lora_path = next(out.glob("lightx2v_random_rank*.safetensors"))
    dt = torch.bfloat16
    settle(device)
    t0 = time.perf_counter()
    # A real BaseModel (what ComfyUI's loaders give ModelPatcher): comfy.lora's key map needs its model_config.
    mc = comfy.supported_models.WAN21_I2V(dict(comfy_dims(args.tcfg), image_model="wan2.1", dtype=dt))
    mc.set_inference_dtype(dt, None)
    base = mc.get_model({}, device=device)  # resident first; detach() moves it to the CPU
    model = base.diffusion_model
    randomize(model)
    vae = wan_vae.WanVAE(dim=8 if args.tiny else 96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                         attn_scales=[], temperal_downsample=[False, True, True]).to(device, dt).eval()
    randomize(vae, 0.01)
    log(f"comfy: built WanModel + WanVAE on {device} in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator("cpu").manual_seed(1)
    frames, h, w = args.frames, args.height, args.width
    video = torch.zeros(1, 3, frames, h, w)
    video[:, :, 0] = torch.rand(1, 3, h, w, generator=g) * 2 - 1  # WanImageToVideo: the image, then gray frames
    lf = (frames - 1) // 4 + 1
    ctx = (torch.randn(1, 512, args.tcfg["text_dim"], generator=g) * 0.1).to(device, dt)
    img = (torch.randn(1, 257, 1280, generator=g) * 0.1).to(device, dt)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for budget in [0.0] + [float(b) for b in args.comfy_budgets.split(",") if b]:
        label = f"comfy {'resident' if not budget else f'{budget:g}GiB weights budget'}"
        patcher = mp.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
        settle(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = rss_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        sd = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(base, {}))
        patcher.add_patches(patches, 1.0)
        # Resident = full_load, as model_management.load_models_gpu asks when the model fits: the LoRA is merged
        # into the weights. lowvram_model_memory=0 without it would make every layer a lowvram one, the LoRA
        # computed on the fly in each forward (the first version of this bench did that).
        patcher.load(device, lowvram_model_memory=int(budget * GiB), force_patch_weights=False, full_load=not budget)
        sync()
        patch_s = time.perf_counter() - t0
        rss_patch = rss_bytes("VmHWM") - rss0
        t0 = time.perf_counter()
        cond = vae.encode(video.to(device, dt))  # (1, 16, lf, h/8, w/8), the latent of the conditioning video
        mask = torch.ones(1, 4, lf, h // 8, w // 8, device=device, dtype=dt)
        sync()
        encode_s = time.perf_counter() - t0
        x = torch.randn(1, 16, lf, h // 8, w // 8, generator=g).to(device, dt)
        step_s = []
        for i in range(args.steps):
            t1 = time.perf_counter()
            t = torch.tensor([1000.0 * (1 - i / args.steps)], device=device)
            v = model(torch.cat([x, mask, cond], 1), t, ctx, clip_fea=img)
            x = x - v / args.steps
            sync()
            step_s.append(round(time.perf_counter() - t1, 3))
        t1 = time.perf_counter()
        pixels = vae.decode(x)
        sync()
        decode_s = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else 0.0
        result(mode=label, what="comfy lora run", patch_s=round(patch_s, 2),
               rss_peak_above_gib=round(rss_patch / GiB, 3), encode_s=round(encode_s, 2),
               steps_s=round(sum(step_s), 2), step_s=step_s, decode_s=round(decode_s, 2),
               peak_sample_gib=round(peak, 2), patches=len(patches), finite=bool(torch.isfinite(pixels).all()),
               frames_out=int(pixels.shape[2]))
        del cond, x, v, pixels, sd, patches
        patcher.detach()
        settle(device)


def table() -> str:
    rows = ["| mode | what | apply s / encode s | steps s (per step) | decode s | RSS peak above (GiB) / VRAM peak |",
            "|---|---|---|---|---|---|"]
    for r in RESULTS:
        if r["what"] == "apply":
            rows.append(f"| {r['mode']} | apply | {r['seconds']} | - | - | +{r['rss_peak_above_gib']} |")
        elif r["what"].startswith("run"):
            per = statistics.median(r["step_s"]) if r["step_s"] else 0
            rows.append(f"| {r['mode']} | {r['what']} | {r['encode_s']} | {r['steps_s']} ({per:.3f}) | "
                        f"{r['decode_s']} | {r['peak_sample_gib']} |")
        elif r["what"] == "strength change":
            rows.append(f"| {r['mode']} | strength 1 -> 0.5 (whole run) | {r['seconds']} | new graphs "
                        f"{r['new_graphs']}, file reads {r['file_reads']}, model loads {r['loads']} | - | - |")
        else:
            per = statistics.median(r["step_s"]) if r["step_s"] else 0
            rows.append(f"| {r['mode']} | {r['what']} (patch {r['patch_s']} s) | {r['encode_s']} | "
                        f"{r['steps_s']} ({per:.3f}) | {r['decode_s']} | +{r['rss_peak_above_gib']} / "
                        f"{r['peak_sample_gib']} |")
    plain = {(r["mode"]): statistics.median(r["step_s"]) for r in RESULTS if r["what"] == "run plain"}
    lora = {(r["mode"]): statistics.median(r["step_s"]) for r in RESULTS if r["what"] == "run lora"}
    for mode in plain:
        if mode in lora and plain[mode] > 0:
            rows.append(f"| {mode} | step with / without LoRA | {lora[mode] / plain[mode]:.3f}x | | | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on the CPU (checks the script)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lora-std", type=float, default=0.01)
    ap.add_argument("--modes", default="stream,stream+fp8,none")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scheduler", default="lcm")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--comfy", action="store_true", help="also ComfyUI's native WanModel with the same LoRA")
    ap.add_argument("--comfy-budgets", default="4")
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "out")))
    args = ap.parse_args()
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    if args.tiny:
        args.width, args.height, args.frames, args.rank = 64, 64, 5, 4
        args.modes = args.modes if args.modes != "stream,stream+fp8,none" else "stream,stream+fp8,none,sequential"
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    log(f"device {device}, {args}")
    run_ours(args, device, out)
    if args.comfy:
        gc.collect()  # our pipeline (42 GiB of host RAM at full size) goes before ComfyUI's model is built
        run_comfy(args, device, out)
    text = table()
    (out / "lora_bench.md").write_text(text + "\n")
    (out / "lora_bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    log(text)


if __name__ == "__main__":
    main()
