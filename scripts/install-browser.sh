#!/usr/bin/env bash
# The one system package the test suite needs beyond `pip install -e ".[test,onnx,serve,peft]"`:
# Debian's headless Chromium and its driver, which tests/test_serve_browser.py drives through
# selenium to check the service's web page. Idempotent: installs only what is missing; needs root
# (or sudo) for apt-get. On other systems install Chromium + a matching chromedriver by hand and put
# both on PATH (the test looks for /usr/bin/chromium, then `chromium`/`chromium-browser` on PATH).
set -euo pipefail
if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null; then
  echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null | tail -1))"; exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
echo "chromium: installed ($(/usr/bin/chromium --version 2>/dev/null | tail -1))"
