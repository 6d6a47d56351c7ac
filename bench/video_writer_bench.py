"""Video writer benchmark: wall time and peak host-memory growth per (writer, format, size), 81 frames each.

Every case runs in a fresh Python process so one case's allocations, caches and loaded codecs cannot inflate
the next. Inside it the clip is built first (float32 [81,H,W,3] in 0..1, smooth moving gradients, filled in
place), a tiny clip of the same format is encoded to load the codec libraries, then the peak-RSS counter is
reset and only the real encode is measured: "peak RSS delta" is what the writer adds on top of the clip.

    python3 bench/video_writer_bench.py                        # the default vramwise cases
    python3 bench/video_writer_bench.py --sizes 832x480 --formats video/h264-mp4
    python3 bench/video_writer_bench.py --plugin my_module     # adds writers/cases, see below

Hook for other writers (e.g. ComfyUI core's SaveWEBM / SaveAnimatedWEBP): write a module that, on import,
calls ``register_writer(name, fn)`` and ``register_case(writer, format_id)``, and pass it with ``--plugin``
(it is imported in the parent and in every case process). ``fn(frames, fps, format_id, out_dir) -> path``
gets the same float32 tensor our writer gets and returns the file it wrote; ``format_id`` is free text for
other writers (for example "video/vp9-webm" for SaveWEBM's codec choice).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FRAMES, FPS = 81, 16.0
SIZES = [(832, 480), (1280, 720)]
Writer = Callable[[object, float, str, str], str]
WRITERS: dict[str, Writer] = {}
CASES: list[tuple[str, str]] = []  # (writer, format_id); crossed with the sizes


def register_writer(name: str, fn: Writer) -> None:
    WRITERS[name] = fn


def register_case(writer: str, format_id: str) -> None:
    if (writer, format_id) not in CASES:
        CASES.append((writer, format_id))


def vramwise_writer(frames: object, fps: float, format_id: str, out_dir: str) -> str:
    import vramwise.video as vv

    return vv.save_video(frames, out_dir, "bench", format_id, fps).path


def convert_only_writer(frames: object, fps: float, format_id: str, out_dir: str) -> str:
    """Our float->uint8 chunking alone, no encoder: the part of the memory growth that is ours."""
    from vramwise.video.frames import frame_order, iter_chunks

    for _ in iter_chunks(frames, frame_order(int(frames.shape[0]), False), 8, frames.shape[1], frames.shape[2]):
        pass
    return ""


register_writer("vramwise", vramwise_writer)
register_writer("convert-only", convert_only_writer)
register_case("vramwise", "video/h264-mp4")
register_case("vramwise", "image/webp")
register_case("convert-only", "uint8 chunks of 8")


def make_frames(count: int, width: int, height: int):
    import torch

    clip = torch.empty(count, height, width, 3, dtype=torch.float32)
    x = torch.linspace(0, 1, width).view(1, width)
    y = torch.linspace(0, 1, height).view(height, 1)
    for i in range(count):  # in place: no clip-sized temporaries that would raise the baseline peak
        phase = i / count
        clip[i, :, :, 0] = 0.5 + 0.45 * torch.sin(6.28 * (x * 1.5 + phase))
        clip[i, :, :, 1] = 0.5 + 0.45 * torch.cos(6.28 * (y * 1.2 - 0.7 * phase))
        clip[i, :, :, 2] = (x * 0.6 + y * 0.4 + 0.2 * phase) % 1.0
    return clip


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM := current RSS
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_case(writer: str, format_id: str, width: int, height: int, out_dir: str) -> dict:
    """Runs inside the case process."""
    fn = WRITERS[writer]
    clip = make_frames(FRAMES, width, height)
    fn(make_frames(2, 64, 64), FPS, format_id, out_dir)  # load codec libraries outside the measurement
    rss_before = _status_bytes("VmRSS")
    exact = _reset_peak() and rss_before is not None
    baseline = rss_before if exact else _peak_bytes()  # without a reset the clip-building peak is the floor
    start = time.perf_counter()
    path = fn(clip, FPS, format_id, out_dir)
    wall = time.perf_counter() - start
    growth = _peak_bytes() - baseline
    return {
        "writer": writer,
        "format": format_id,
        "size": f"{width}x{height}",
        "frames": FRAMES,
        "wall_s": round(wall, 2),
        "peak_rss_delta_mib": round(growth / 2**20, 1),
        "clip_mib": round(clip.numel() * 4 / 2**20, 1),
        "output_mib": round(os.path.getsize(path) / 2**20, 2) if os.path.isfile(path) else None,
        "fps_encoded": round(FRAMES / wall, 1),
        "peak_exact": exact,
    }


def _load_plugins(names: list[str]) -> None:
    # Plugins import this file as ``video_writer_bench``; when it runs as __main__ make that name this module,
    # so what they register lands in the registries main() reads.
    sys.modules.setdefault("video_writer_bench", sys.modules[__name__])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for name in names:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="e.g. 832x480,1280x720")
    parser.add_argument("--formats", default="", help="comma-separated format ids to keep (default: all cases)")
    parser.add_argument("--writers", default="", help="comma-separated writer names to keep (default: all)")
    parser.add_argument("--plugin", action="append", default=[], help="module that registers writers/cases")
    parser.add_argument("--out", default="", help="folder for outputs and results.json (default: a temp folder)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: JSON of one case to run here
    args = parser.parse_args(argv)
    _load_plugins(args.plugin)

    if args.one:
        case = json.loads(args.one)
        print("RESULT " + json.dumps(run_case(**case)), flush=True)
        return 0

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    keep_formats = set(filter(None, args.formats.split(",")))
    keep_writers = set(filter(None, args.writers.split(",")))
    out_root = args.out or tempfile.mkdtemp(prefix="video-writer-bench-")
    results = []
    for writer, format_id in CASES:
        if (keep_formats and format_id not in keep_formats) or (keep_writers and writer not in keep_writers):
            continue
        for width, height in sizes:
            case_dir = os.path.join(out_root, f"{writer}-{format_id.replace('/', '_')}-{width}x{height}")
            os.makedirs(case_dir, exist_ok=True)
            one = json.dumps(
                {"writer": writer, "format_id": format_id, "width": width, "height": height, "out_dir": case_dir}
            )
            cmd = [sys.executable, os.path.abspath(__file__), "--one", one]
            for plugin in args.plugin:
                cmd += ["--plugin", plugin]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                result = {
                    "writer": writer,
                    "format": format_id,
                    "size": f"{width}x{height}",
                    "error": proc.stderr[-2000:],
                }
            else:
                result = json.loads(line[len("RESULT ") :])
            print(json.dumps(result), flush=True)
            results.append(result)

    with open(os.path.join(out_root, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print()
    print("| case | wall s | encoded fps | peak RSS delta MiB | clip MiB (float32) | output MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        name = f"{r['writer']} {r['format']} {r['size']}"
        if "error" in r:
            print(f"| {name} | error: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'} | | | | |")
            continue
        mark = "" if r["peak_exact"] else " (approx.)"
        cells = [r["wall_s"], r["fps_encoded"], f"{r['peak_rss_delta_mib']}{mark}", r["clip_mib"], r["output_mib"]]
        print(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    print(f"\noutputs: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
