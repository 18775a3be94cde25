#!/usr/bin/env bash
# Run the test suite on the CPU, creating .venv first if it is missing.
#   bash scripts/test.sh             (extra arguments go to pytest, e.g. -m "not slow" or -k rope)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -q "$@"
