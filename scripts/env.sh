#!/usr/bin/env bash
# Create the virtual environment .venv with longctx and its dependencies, unless it already works.
#   bash scripts/env.sh            (PYTHON=python3.11 TORCH_SPEC="torch==2.13.0" to choose)
# torch is pinned first so that pip does not pull a different build through another package's range.
# Then the `gguf` extra (llama-cpp-python, which checks `longctx export --gguf`): pip builds llama.cpp from source
# once (59 min measured on 2 cores shared with other jobs, CMAKE_BUILD_PARALLEL_LEVEL=2) and reuses the wheel from
# its cache afterwards.
# Where it cannot build (or not within GGUF_BUILD_TIMEOUT), the GGUF tests are skipped with the reason;
# .venv/.gguf-build-failed stops retries (delete it to try again).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! { [ -x "$PY" ] && "$PY" -c "import longctx, torch, transformers, peft, deepspeed, bitsandbytes, datasets, submitit, psutil, pytest" 2>/dev/null; }; then
  echo "[env] creating .venv (a few minutes on first use)" >&2
  "${PYTHON:-python3}" -m venv .venv
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$PY" -m pip install -q -r requirements.txt
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  "$PY" -m pip install -q "pytest>=8"  # the `test` extra of pyproject.toml (the core has no test tools)
  "$PY" -c "import longctx, torch, transformers; print('[env] ready: torch', torch.__version__, '| transformers', transformers.__version__)" >&2
fi
"$PY" -c "import sentencepiece" 2>/dev/null || "$PY" -m pip install -q "sentencepiece>=0.1.98,<0.3"  # a wheel
if ! "$PY" -c "import llama_cpp, sentencepiece" 2>/dev/null && [ ! -e .venv/.gguf-build-failed ]; then
  echo "[env] installing the gguf extra of pyproject.toml (llama.cpp is compiled once; pip caches the wheel)" >&2
  # bounded (GGUF_BUILD_TIMEOUT seconds, default 40 min) so that a slow machine cannot push CI past its limit
  if ! CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" timeout "${GGUF_BUILD_TIMEOUT:-2400}" \
      "$PY" -m pip install -q --no-build-isolation -e ".[gguf]"; then
    touch .venv/.gguf-build-failed
    echo "[env] llama-cpp-python could not be installed: the GGUF export tests will be skipped" >&2
  fi
fi
