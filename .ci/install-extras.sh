#!/usr/bin/env bash
# What the deployment tests need beyond `pip install -e .[test]`: the onnx/serve extras,
# selenium, and Debian's headless Chromium + its driver (tests/test_serve_browser.py).
# Idempotent: installs only what is missing. Called from .ci/run; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
# The extras as pyproject declares them (torch is already there: never reinstall it here).
$PY -c "import onnx, onnxruntime, fastapi, uvicorn, multipart" 2>/dev/null \
  || $PY -m pip install --quiet "onnx>=1.15" "onnxruntime>=1.17" "fastapi>=0.110" "uvicorn>=0.27" \
       "python-multipart>=0.0.9"
# selenium drives Chromium through chromedriver; 4.51 is the newest whose pins resolve on our
# index mirror (4.52 wants a certifi the mirror lacks).
$PY -c "import selenium" 2>/dev/null || $PY -m pip install --quiet "selenium>=4.20,<=4.51.0" requests

if ! { [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null; }; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
echo "deployment test extras: ok ($(/usr/bin/chromium --version 2>/dev/null | tail -1))"
