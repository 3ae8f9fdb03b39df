#!/usr/bin/env bash
# Install Debian's headless browser for the web page test (tests/serving/test_browser.py).
# Idempotent: does nothing when chromium and its driver are already there. Needs root (CI is).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
