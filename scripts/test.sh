#!/usr/bin/env bash
# Builds the environment if needed (venv, test ComfyUI) and runs the whole test suite; extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.cache/venv/bin/python" -m pytest "$@"
