"""The stream and auto offload modes and the unload node on the real server with the tiny Wan model."""

from __future__ import annotations

import pytest

from api_prompts import i2v_prompt
from comfy_harness import execution_error

pytestmark = pytest.mark.server


@pytest.mark.parametrize("offload", ["stream", "auto"])
def test_stream_and_auto_modes_run_the_tiny_wan_workflow(comfy_server, offload):
    entry = comfy_server.run(i2v_prompt(offload=offload))
    status = entry.get("status", {})
    assert status.get("status_str") == "success", execution_error(entry) or status


def test_stream_with_fp8_storage_runs(comfy_server):
    entry = comfy_server.run(i2v_prompt(offload="stream", dtype="fp8_e4m3fn"))
    assert entry.get("status", {}).get("status_str") == "success", execution_error(entry)
