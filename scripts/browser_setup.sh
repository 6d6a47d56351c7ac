#!/usr/bin/env bash
# Installs what the browser tests (tests/test_browser_workflows.py) need, only where it is missing:
# Debian's chromium at /usr/bin/chromium and npm playwright-core (pinned) under .cache/browser.
# Idempotent; runs as root in CI. Override the browser with VRAMWISE_CHROMIUM=/path/to/chromium.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLAYWRIGHT_VERSION="1.65.1"
PREFIX="$ROOT/.cache/browser"
CHROMIUM="${VRAMWISE_CHROMIUM:-/usr/bin/chromium}"

if [ ! -x "$CHROMIUM" ]; then
    echo "browser_setup: installing chromium (apt-get)" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

installed=""
if [ -f "$PREFIX/node_modules/playwright-core/package.json" ]; then
    installed="$(node -p "require('$PREFIX/node_modules/playwright-core/package.json').version" 2>/dev/null || true)"
fi
if [ "$installed" != "$PLAYWRIGHT_VERSION" ]; then
    command -v npm >/dev/null || { echo "browser_setup: npm (Node.js >= 18) is needed on PATH" >&2; exit 1; }
    echo "browser_setup: installing playwright-core@$PLAYWRIGHT_VERSION into $PREFIX" >&2
    mkdir -p "$PREFIX"
    npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
fi
