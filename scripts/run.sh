#!/usr/bin/env bash
# Install everything into ./.venv and stream Gemma 3 270M to the terminal (README command 1).
# Usage: bash scripts/run.sh ["prompt"] [more decode.generate flags, e.g. --temperature=0.8]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet -e .
# The published 270M checkpoint is a base model: it continues text (add --chat for the
# Gemma turn template).
python -m decode.generate --config=configs/gemma3_270m.py \
  --prompt="${1:-Once upon a time, in a lighthouse at the edge of the sea,}" \
  --max_new_tokens=200 --temperature=0.8 --top_p=0.95 --seed=1 "${@:2}"
