#!/usr/bin/env bash
# Install everything into ./.venv and stream Gemma 3 270M to the terminal (README command 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet -e .
python -m decode.generate --config=configs/gemma3_270m.py \
  --prompt="${1:-Write a short story about a lighthouse keeper.}" --chat "${@:2}"
