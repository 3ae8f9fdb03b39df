#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (README command 2).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet -e ".[test]"
# The browser test drives Debian's headless Chromium; install it when it is missing.
bash scripts/install_browser.sh
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
# pytest exits 5 when a selection (-k, a path) matched no test: report it, don't fail.
if [ "$status" -eq 5 ]; then echo "pytest: no tests matched the selection" >&2; exit 0; fi
exit "$status"
