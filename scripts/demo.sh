#!/usr/bin/env bash
# Fresh machine to a written video: builds the environment (first run only), a tiny random Wan2.1 model,
# starts a local ComfyUI with this pack, runs workflows/vramwise_tiny_demo.json and prints the video's path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.cache/venv/bin/python" "$ROOT/scripts/demo.py" "$@"
