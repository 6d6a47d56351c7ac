"""Host RAM of a real ComfyUI server over many runs (VmRSS of the server process from /proc)."""

from __future__ import annotations

import pytest

from api_prompts import assert_success, i2v_prompt
from medium_models import build_medium_wan21_i2v
from rss import rss

MiB = 2**20
RUNS = 20


@pytest.fixture(scope="module")
def medium_model(comfy_server, tiny_models_root, tmp_path_factory) -> str:
    folder = build_medium_wan21_i2v(tiny_models_root / "tiny-wan21-i2v", tmp_path_factory.mktemp("medium") / "wan")
    name = "medium-wan21-i2v"
    link = comfy_server.models_dir / "diffusers" / name
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    return name


def test_twenty_runs_do_not_grow_the_server_and_changing_models_gives_the_memory_back(comfy_server, medium_model):
    pid = comfy_server.proc.pid

    def run(model: str, i: int, **kw) -> None:
        # a new prompt every fourth run: the text encoder is re-read from its files and released again
        assert_success(comfy_server.run(i2v_prompt(model, offload="stream", seed=i, save="preview",
                                                   prompt=f"a yellow ball rolls, take {i // 4}", **kw)))

    run(medium_model, 0)
    after_first = rss(pid)
    for i in range(1, RUNS):
        run(medium_model, i)
    after_all = rss(pid)
    assert after_all - after_first <= 0.02 * after_first, (after_first / MiB, after_all / MiB)
    # Another model in the same loader slot: the medium model (~295 MiB of weights) is released first.
    run("tiny-wan21-i2v", 0)
    assert after_all - rss(pid) >= 200 * MiB, (after_all / MiB, rss(pid) / MiB)
