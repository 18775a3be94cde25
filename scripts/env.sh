#!/usr/bin/env bash
# Create the virtual environment .venv with longctx and its dependencies, unless it already works.
#   bash scripts/env.sh            (PYTHON=python3.11 TORCH_SPEC="torch==2.13.0" to choose)
# torch is pinned first so that pip does not pull a different build through another package's range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -x "$PY" ] && "$PY" -c "import longctx, torch, transformers, peft, deepspeed, bitsandbytes, datasets, submitit, psutil, pytest" 2>/dev/null; then
  exit 0
fi
echo "[env] creating .venv (a few minutes on first use)" >&2
"${PYTHON:-python3}" -m venv .venv
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -m pip install -q "pytest>=8"  # the `test` extra of pyproject.toml (the core has no test tools)
"$PY" -c "import longctx, torch, transformers; print('[env] ready: torch', torch.__version__, '| transformers', transformers.__version__)" >&2
