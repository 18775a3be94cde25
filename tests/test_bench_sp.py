"""scripts/bench_sp.py runs end to end (--smoke: tiny-base at N = 128, P = 1 and P = 2 through torchrun); its
timed results come from the lead's runs on a quiet machine, never from CI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two torchrun launches (1 and 2 processes) of a DeepSpeed training run: about a minute
def test_bench_sp_smoke_measures_both_sizes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_sp.py"), "--smoke"], capture_output=True,
                          text=True, cwd=ROOT, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 | 128 |") or
            line.startswith("| 2 | 64 |")]
    assert len(rows) == 2 and all(float(r.split("|")[3]) > 0 and float(r.split("|")[4]) > 0 for r in rows), proc.stdout
    assert "- P = 1: 128" in proc.stdout and "- P = 2: 128" in proc.stdout
