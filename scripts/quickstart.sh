#!/usr/bin/env bash
# Extend data/tiny-base from 256 to 1024 tokens on the CPU and evaluate it, creating .venv first if missing.
#   bash scripts/quickstart.sh       (extra arguments are config overrides, e.g. train.max_steps=20)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python train.py configs/quickstart.yaml "$@"
