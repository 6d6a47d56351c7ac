"""GPU checks of the engine as the nodes drive it (load_pipeline -> generate_with_plan -> decode_latents).

    python3 bench/engine_gpu_checks.py baseline            # memory back to the pre-run baseline after error/cancel
    python3 bench/engine_gpu_checks.py budgets --budgets 24,16,12,8 --frames 81 --steps 4
    python3 bench/engine_gpu_checks.py budgets --budgets 12 --token-merge 0.5 --no-decode   # merge x stream offload

``baseline`` uses the tiny Wan2.1 I2V pipeline (scripts/tiny_models.py) per offload mode (none, stream, auto).
``budgets`` builds a full-size random Wan2.1-I2V-14B pipeline in memory (transformer 40 layers, UMT5-XXL text
encoder, CLIP ViT-H vision encoder, Wan VAE; random weights, std 0.02) and runs it under offload mode ``auto`` with
an emulated smaller GPU: ``torch.cuda.set_per_process_memory_fraction`` caps the allocator and the engine's
free-memory probe reports the same cap. Prints one ``RESULT {json}`` line per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

GiB = 2**30


def log(msg: str) -> None:
    print(msg, flush=True)


def result(**kw) -> None:
    log("RESULT " + json.dumps(kw))


class Cancelled(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (raised from the step observer)."""


class Observer:
    def __init__(self, cancel_at: int | None = None) -> None:
        self.cancel_at = cancel_at
        self.steps = 0
        self.times: list[float] = []  # perf_counter after each step

    def step_seconds(self) -> list[float]:
        """Seconds of each step after the first (the first also carries the warm-up)."""
        return [round(b - a, 2) for a, b in zip(self.times, self.times[1:])]

    def on_step(self, step, total, latents):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.steps = step
        if self.cancel_at is not None and step >= self.cancel_at:
            raise Cancelled(f"cancel at step {step}")

    def check_cancel(self):
        pass


def inject_error(pipe, denoiser: str = "transformer", block: int = 1, after_calls: int = 2):
    """A forward pre-hook that raises inside the denoiser (mid-forward, slots live) on its ``after_calls``-th call."""
    model = getattr(pipe, denoiser)
    blocks = getattr(model, "blocks")
    calls = {"n": 0}

    def hook(mod, args):
        calls["n"] += 1
        if calls["n"] >= after_calls:
            raise RuntimeError("injected failure mid-sampling")

    return blocks[min(block, len(blocks) - 1)].register_forward_pre_hook(hook)


def settle() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def request(width, height, frames, steps, seed=0):
    from vramwise.families.base import GenerationRequest
    from vramwise.image_prep import ResizeMode, fit_image

    g = torch.Generator().manual_seed(seed)
    image = fit_image(torch.rand(height, width, 3, generator=g), width, height, ResizeMode.CROP)
    return GenerationRequest(image=image, prompt="a red ball rolls across a table", negative_prompt="blurry",
                             width=width, height=height, num_frames=frames, steps=steps, cfg=5.0, seed=seed,
                             shift=3.0)


def error_and_cancel(model, req, label, run):
    """run(model, req, observer) once clean, once with an injected error, once cancelled; memory each time."""
    base = settle()
    run(model, req, Observer())
    after_ok = settle()
    h = inject_error(model.loaded.pipe)
    err = None
    try:
        run(model, req, Observer())
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e)[:80]}"
    finally:
        h.remove()
    after_err = settle()
    cancel = None
    try:
        run(model, req, Observer(cancel_at=1))
    except Cancelled as e:
        cancel = str(e)
    after_cancel = settle()
    result(check="baseline", mode=label, baseline_bytes=base, after_ok_bytes=after_ok, after_error_bytes=after_err,
           after_cancel_bytes=after_cancel, error=err, cancel=cancel,
           ok=after_err == base and after_cancel == base and err is not None and cancel is not None)


def part_baseline(args) -> None:
    import tiny_models

    from vramwise.handles import VramwiseModel
    from vramwise.loader import LoadOptions, PipelineCache
    from vramwise.memory.planned_run import generate_with_plan
    from vramwise.offload import OffloadMode
    from vramwise.precision import WeightDtype

    from vramwise.offload import stream as stream_mod

    stream_mod.SETTINGS.compile_blocks = "off"  # memory bookkeeping is the point here, not speed
    root = Path(tempfile.mkdtemp())
    folder = tiny_models.build_wan21_i2v(root / "tiny-wan21-i2v")
    dev = torch.device("cuda")
    for mode in ("none", "stream", "auto"):
        cache = PipelineCache()
        loaded, _ = cache.get_or_load("s", LoadOptions(folder, OffloadMode(mode), WeightDtype.BF16), dev)
        model = VramwiseModel(loaded)
        req = request(64, 64, 9, 3)
        error_and_cancel(model, req, mode,
                         lambda m, r, o: generate_with_plan(m, r, o, cache=cache))
        cache.release_all()
        del model, loaded
        result(check="after_unload", mode=mode, allocated_bytes=settle())


# ---- full-size random pipeline -----------------------------------------------------------------------------------
def randomize(module, std=0.02):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0, std)


def build_full_pipeline(layers: int):
    import tiny_models
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from offload_bench import wan_config

    dev = torch.device("cuda")
    dt = torch.bfloat16
    t0 = time.time()
    parts = {}
    with torch.device(dev):
        parts["transformer"] = WanTransformer3DModel(**wan_config(layers)).to(dt).eval()
    randomize(parts["transformer"])
    parts["transformer"].to("cpu")
    tok = tiny_models._umt5_tokenizer()
    t5 = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    with torch.device(dev):
        parts["text_encoder"] = UMT5EncoderModel(t5).to(dt).eval()
    randomize(parts["text_encoder"])
    parts["text_encoder"].to("cpu")
    clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    with torch.device(dev):
        parts["image_encoder"] = CLIPVisionModel(clip).to(dt).eval()
    randomize(parts["image_encoder"])
    parts["image_encoder"].to("cpu")
    with torch.device(dev):
        vae = AutoencoderKLWan().to(dt).eval()  # bf16, as family.load(torch_dtype=bf16) loads it
    parts["vae"] = vae.to("cpu")
    torch.cuda.empty_cache()
    pipe = WanImageToVideoPipeline(
        tokenizer=tok, text_encoder=parts["text_encoder"], vae=parts["vae"], scheduler=tiny_models._unipc_flow(3.0),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        image_encoder=parts["image_encoder"], transformer=parts["transformer"],
    )
    sizes = {k: round(sum(p.numel() * p.element_size() for p in m.parameters()) / GiB, 2) for k, m in parts.items()}
    log(f"built full pipeline in {time.time() - t0:.0f}s: {sizes} GiB")
    return pipe


class MemSource:
    """LoadOptions.source for an in-memory pipeline (a reload after a step-down re-places the same objects)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.loads = 0
        self.loaded = None  # the handle, set once loaded: a reload takes its old placement's hooks off first

    def family(self):
        from vramwise.families.wan import Wan21I2V

        return Wan21I2V()

    def load(self, torch_dtype, keep_fp8=False):
        self.loads += 1
        if self.loads > 1:
            unplace(self.pipe, self.loaded.placement)  # the placement being replaced
        return self.pipe


def unplace(pipe, placement) -> None:
    from accelerate.hooks import remove_hook_from_module

    placement.remove()
    for name, m in pipe.components.items():
        if isinstance(m, torch.nn.Module):
            remove_hook_from_module(m, recurse=True)
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                from diffusers.hooks import HookRegistry  # noqa: F401

                for sub in m.modules():
                    reg = getattr(sub, "_diffusers_hook", None)
                    if reg is not None:
                        for hname in list(getattr(reg, "hooks", {})):
                            if "group_offloading" in hname or "lazy_prefetch" in hname:
                                reg.remove_hook(hname, recurse=False)
            m.to("cpu")
    settle()


def emulate_card(gib: float) -> None:
    import vramwise.decode as decode_mod
    import vramwise.device as device_mod

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total))
    cap = int(gib * GiB)

    def free_bytes(device):
        if device.type != "cuda":
            return device_mod.host_available_bytes()
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free + torch.cuda.memory_reserved(device), cap) - torch.cuda.memory_allocated(device))

    device_mod.free_bytes = free_bytes
    decode_mod.free_bytes = free_bytes


def part_budgets(args) -> None:
    from vramwise.decode import TilingOptions, decode_latents
    from vramwise.handles import VramwiseModel
    from vramwise.loader import LoadOptions, PipelineCache
    from vramwise.memory.planned_run import generate_with_plan
    from vramwise.offload import OffloadMode
    from vramwise.offload import stream as stream_mod
    from vramwise.precision import WeightDtype

    torch.backends.cuda.matmul.allow_tf32 = True
    stream_mod.SETTINGS.compile_blocks = args.compile
    pipe = build_full_pipeline(args.layers)
    budgets = [float(b) for b in args.budgets.split(",")]
    emulate_card(budgets[0])
    cache = PipelineCache()
    src = MemSource(pipe)
    opts = LoadOptions(Path("wan21-i2v-14b-random"), OffloadMode.AUTO, WeightDtype.BF16, source=src)
    t0 = time.time()
    loaded, _ = cache.get_or_load("s", opts, torch.device("cuda"))
    src.loaded = loaded
    log(f"placed in {time.time() - t0:.0f}s: {loaded.placement.describe()}")
    model = VramwiseModel(loaded)
    req = request(832, 480, args.frames, args.steps)
    runs = [("plain", model)]
    if args.token_merge:
        from vramwise.token_merge import TokenMergePatch

        patch = TokenMergePatch(ratio=args.token_merge, start_percent=0.0, skip_first_blocks=0, skip_last_blocks=0)
        runs.append((f"token merge {args.token_merge:g}", model.with_patch(patch)))
    for gib in budgets:
        for label, run_model in runs:
            emulate_card(gib)
            settle()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            row = dict(check="budget", run=label, budget_gib=gib, frames=args.frames, steps=args.steps,
                       compile=args.compile)
            obs = Observer()
            try:
                latent, report = generate_with_plan(run_model, req, obs, vram_budget_gb=gib, headroom_gb=0.0,
                                                    cache=cache)
                t_sample = time.time() - t0
                peak_sample = torch.cuda.max_memory_allocated()
                row.update(ok=True, report=report, sample_s=round(t_sample, 1), step_s=obs.step_seconds(),
                           peak_sample_gib=round(peak_sample / GiB, 2), loads=src.loads)
                if not args.no_decode:
                    torch.cuda.reset_peak_memory_stats()
                    t1 = time.time()
                    frames, note = decode_latents(run_model, latent, TilingOptions())
                    row.update(decode_s=round(time.time() - t1, 1), decode_note=note,
                               peak_decode_gib=round(torch.cuda.max_memory_allocated() / GiB, 2),
                               finite=bool(torch.isfinite(frames).all()))
                else:
                    row.update(finite=bool(torch.isfinite(latent.samples).all()))
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}", s=round(time.time() - t0, 1))
            result(**row)
    if args.cancel_checks:
        emulate_card(budgets[-1])
        error_and_cancel(model, request(832, 480, 33, 2), f"auto (full 14B, {budgets[-1]:g} GiB card)",
                         lambda m, r, o: generate_with_plan(m, r, o, vram_budget_gb=budgets[-1], headroom_gb=0.0,
                                                            cache=cache))


def _ftfy_stand_in() -> None:
    """diffusers' Wan prompt cleaning calls ftfy when it is installed; the device image lacks it."""
    import types

    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    if not hasattr(wan_i2v, "ftfy"):
        wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["baseline", "budgets"])
    ap.add_argument("--budgets", default="24,16,12,8")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--cancel-checks", action="store_true")
    ap.add_argument("--token-merge", type=float, default=0.0,
                    help="budgets: also run each budget with token merging at this ratio (all steps, all blocks)")
    ap.add_argument("--no-decode", action="store_true", help="budgets: sample only")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    _ftfy_stand_in()
    (part_baseline if args.part == "baseline" else part_budgets)(args)


if __name__ == "__main__":
    main()
