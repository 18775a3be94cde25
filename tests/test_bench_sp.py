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
    # peak, memory added by training, tokens/s: all measured (> 0) for both sizes
    assert len(rows) == 2 and all(float(c) > 0 for r in rows for c in r.split("|")[3:6]), proc.stdout
    assert "- P = 1: 128" in proc.stdout and "- P = 2: 128" in proc.stdout


@pytest.mark.slow  # one torchrun launch: about half a minute
def test_bench_sp_budget_stops_a_run_that_adds_more():
    """--budget-gib limits what training adds above the rank's memory at train begin: 1 MiB is less than any step
    needs, so the watchdog must stop the run and the search must report that nothing fits (not a crash)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_sp.py"), "--smoke", "--sizes", "1",
                           "--budget-gib", "0.001"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- P = 1: none fits" in proc.stdout and "crossed the limit" in proc.stdout, proc.stdout
