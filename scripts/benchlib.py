"""What the training benchmarks share: one training step through Trainer, run in a fresh process under an RSS
watchdog, the fp32 matmul peak of this machine, and the machine's description for the results files.

    from benchlib import run_worker, train_step, matmul_peak_flops, machine
    result = run_worker(["scripts/bench_train.py", "--worker", json.dumps(spec)], rss_limit=20 * 2**30)

Each measured configuration runs in its own process, so an earlier run's freed-but-cached memory cannot hide a
later run's peak; the child reports its own peak RSS (ru_maxrss, exact) and the parent kills it when its RSS
crosses `rss_limit` (sampled every 50 ms), which is how "does not fit into this machine" is decided without
waking the kernel's OOM killer on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "


def machine() -> str:
    """Cores, RAM, CPU model, torch and transformers versions, today: the header line of every results file."""
    import torch
    import transformers

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {ram:.1f} GiB RAM, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, {date.today()}")


def matmul_peak_flops(size: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 FLOP/s of a square matmul on this machine now: the peak that MFU is measured against."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def report(result: dict) -> None:
    """The worker's last word: one tagged JSON line on stdout that `run_worker` picks up."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def run_worker(args: list[str], rss_limit: int | None = None, timeout: float | None = None,
               env: dict[str, str] | None = None) -> dict:
    """Run `python *args` in a fresh process; its reported dict, or {"fits": False, ...} if it crossed rss_limit.

    `env`: variables added to the worker's environment (e.g. glibc's MALLOC_MMAP_THRESHOLD_).

    Any other failure raises with the worker's stderr tail: a crash is not a measurement.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        seen = 0
        while proc.poll() is None:
            seen = max(seen, _rss_of(proc.pid))
            if rss_limit and seen > rss_limit:
                proc.kill()
                proc.wait()
                return {"fits": False, "killed_at_rss": seen, "wall_s": round(time.perf_counter() - t0, 1)}
            if timeout and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"worker {args} ran past {timeout} s")
            time.sleep(0.05)
        out = proc.stdout.read()
        err.seek(0)
        tail = err.read()[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed (exit {proc.returncode}):\n{tail}")
    return {"fits": True, **json.loads(lines[-1][len(RESULT_TAG):])}


def make_trainer(model, chunked_loss: bool, plain: bool = False):
    """A Trainer around `model` for single steps: longctx's (chunked loss) or, with plain=True, transformers' own.

    The model must be set up already (LoRA, trainable params, checkpointing, attention): the Trainer only brings
    the loss, the backward and the AdamW optimizer the real runs use.
    """
    from transformers import Trainer, TrainingArguments

    from longctx.trainer import LongctxTrainer

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench_"), use_cpu=True, report_to=[],
                             per_device_train_batch_size=1, learning_rate=1e-5, save_strategy="no")
    if plain:
        trainer = Trainer(model=model, args=args)
    else:
        trainer = LongctxTrainer(model=model, args=args, chunked_loss=chunked_loss)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which single steps bypass
    return trainer


def train_step(trainer, batch: dict) -> float:
    """One optimizer step (forward, backward, AdamW step) on `batch`; its wall seconds."""
    model = trainer.model
    model.train()
    t0 = time.perf_counter()
    trainer.training_step(model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
