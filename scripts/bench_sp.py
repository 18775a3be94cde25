"""Sequence parallelism (issue 12): per-process peak memory and tokens/s of training steps at P = 1 and P = 2 for
the same N, and the longest N that fits per process under one per-process memory limit.

    python scripts/bench_sp.py --out benchmarks/sp.md                     # on GPUs: absolute limit (--limit-gib)
    OMP_NUM_THREADS=1 python scripts/bench_sp.py --budget-gib 1.5 --group-size 2048 --out benchmarks/sp.md  # CPU
    python scripts/bench_sp.py --smoke                                    # a minute: checks that it runs

Every measurement is a real `longctx train` (train.py's code path: Trainer, DeepSpeed ZeRO-2, S², the chunked SP
loss) launched with `torchrun --nproc_per_node P`, P = 1 included, so both sides pay the same engine. Each rank
reports its own peak: max RSS on the CPU, `torch.cuda.max_memory_allocated` on a GPU, and the part of it that
training added (the peak minus what the rank held when training began). The limit is enforced inside each rank (a
watchdog thread exits the rank when its RSS crosses it on the CPU; `torch.cuda.set_per_process_memory_fraction`
on a GPU), so "does not fit" never wakes the kernel's OOM killer. --limit-gib is absolute; --budget-gib limits
what training adds, which is what SP divides: on the CPU each rank's fixed ~0.6 GiB (Python, torch, DeepSpeed,
the model, the dataset) would otherwise need N far past 64k before the activations matter.
tokens/s is the steady rate of steps 2..S (step 1 includes warm-up), from the Throughput callback's log; with
OMP_NUM_THREADS=1 each process is one core, as each is one GPU in the real case.

The longest N per P: double N from --start until a run fails or passes --max-len, then bisect between the last
fit and the first failure down to --resolution (runs of --search-steps steps, default 1: at 16k the peak over 3 steps was 2-3% above the first step's).
A fixed --group-size keeps a step's cost linear in N, so the search reaches far on the CPU.
Target (issue 12): P = 2 fits at least 1.8x the tokens of P = 1.
Not measured here: DeepSpeed's TiledMLP and tiled logits loss (longctx's chunked loss already keeps one chunk of
logits; the MLP's [N, I] intermediates are what TiledMLP would cut).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# One measurement: a rank of `torchrun --nproc_per_node P bench_sp.py --worker SPEC`

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rss_watchdog(limit: int, out: str) -> None:
    """Exit this rank (code 3) as soon as its RSS crosses `limit` bytes: the run then "does not fit" (said in
    OUT/over-rankR.txt for the row's "why")."""
    def watch():
        while True:
            try:
                rss = _status_bytes("VmRSS")
            except (OSError, StopIteration):
                rss = 0
            if rss > limit:
                from longctx import dist

                Path(out, f"over-rank{dist.rank()}.txt").write_text(
                    f"rank {dist.rank()}: RSS {rss / GIB:.3f} GiB crossed the limit {limit / GIB:.3f} GiB")
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def _cap_memory(limit: int, out: str) -> None:
    """Make this rank fail as soon as it holds more than `limit` bytes: the GPU allocator's fraction, or the RSS
    watchdog on the CPU."""
    import torch

    from longctx import dist

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(dist.local_rank()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dist.local_rank())
    else:
        _rss_watchdog(limit, out)


def _limit_from_start(budget: int, out: str):
    """A TrainerCallback that measures (and, with a budget, limits) the memory training adds to this rank.

    On the CPU a rank holds about 0.6 GiB before its first step (Python, torch, DeepSpeed, the model, the
    optimizer's partitions, the tokenized dataset), whatever N is: an absolute limit then mostly measures that
    floor, not the activations that SP divides. So at train begin: the baseline is the rank's RSS,
    the kernel's high-water mark is reset (writing 5 to /proc/self/clear_refs, Linux >= 4.0) so that VmHWM at the
    end is the peak of training alone, and the watchdog's limit is baseline + budget. On a GPU the same with
    torch.cuda.memory_allocated / reset_peak_memory_stats / set_per_process_memory_fraction.
    """
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class StepMemory(TrainerCallback):
        baseline = step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                self.baseline = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.baseline = _status_bytes("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
            if budget:
                _cap_memory(self.baseline + budget, out)

        def on_train_end(self, args, state, control, **kwargs):
            peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
            self.step = peak - self.baseline

    return StepMemory()


def worker(spec: dict) -> None:
    import resource

    import torch

    from longctx import dist
    from longctx.config import load_config
    from longctx.trainer import train

    if spec.get("limit_gib"):
        _cap_memory(int(spec["limit_gib"] * GIB), spec["out"])
    step_memory = _limit_from_start(int((spec.get("budget_gib") or 0) * GIB), spec["out"])
    train(load_config(data=spec["config"]), callbacks=[step_memory])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["out"], f"rank{dist.rank()}.json").write_text(json.dumps(
        {"peak_bytes": peak, "baseline_bytes": step_memory.baseline, "step_bytes": step_memory.step}))


def run_config(args, n: int, steps: int) -> dict:
    attention = {"type": args.attention, "group_size_ratio": args.ratio}
    if args.group_size:  # a fixed group: a step's cost grows linearly with N, so the search reaches far
        attention["group_size"] = args.group_size
    return {
        "model": {"name_or_path": args.model, "dtype": args.dtype},
        "attention": attention,
        "data": {"train": args.data, "num_proc": 1},
        "train": {"output_dir": "", "seq_len": n, "max_steps": steps, "save_steps": steps, "logging_steps": 1,
                  "per_device_train_batch_size": 1, "gradient_accumulation_steps": args.grad_accum, "warmup_steps": 0,
                  "gradient_checkpointing": True, "deepspeed": str(ROOT / args.deepspeed), "resume": "off",
                  "bf16": args.dtype == "bfloat16"},
    }


def measure(args, p: int, n: int, steps: int) -> dict:
    """One run of `steps` training steps at P = p, N = n: {"fits", "peak_gib" (max over ranks), "step_gib" (the
    memory training added, max over ranks), "tokens_per_s"}."""
    with tempfile.TemporaryDirectory(prefix="bench_sp_") as tmp:
        cfg = run_config(args, n, steps)
        cfg["train"]["output_dir"] = str(Path(tmp) / "run")
        cfg["train"]["sequence_parallel_size"] = p
        spec = {"config": cfg, "out": tmp, "limit_gib": args.limit_gib, "budget_gib": args.budget_gib}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(p),
               "--master_port", str(29500 + os.getpid() % 1000), str(Path(__file__).resolve()), "--worker",
               json.dumps(spec)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        # glibc returns a freed block to the OS only if it was mmapped, and by default it raises the mmap threshold
        # up to 32 MiB as big blocks are freed: activations under that size then stay in the heap, and RSS grew
        # less from 16k to 32k tokens than from 2k to 16k (measured). A fixed threshold (which also turns off the
        # raising) makes RSS follow the tensors alive, as torch.cuda.max_memory_allocated does on a GPU.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # slow, not out of memory: said in the row, so the search's bound shows it
            return {"P": p, "N": n, "tokens_per_process": n // p, "fits": False, "wall_s": args.timeout,
                    "why": f"timed out after {args.timeout:g} s (not a memory failure; raise --timeout)"}
        row = {"P": p, "N": n, "tokens_per_process": n // p, "steps": steps, "fits": proc.returncode == 0,
               "wall_s": round(time.perf_counter() - t0, 1)}
        over = sorted(Path(tmp).glob("over-rank*.txt"))
        if over:
            row["why"] = over[0].read_text()
            return row
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("=")]
            row["why"] = next((line for line in lines if "train." in line or "Error" in line), lines[-1] if lines
                              else f"exit {proc.returncode}")[-300:]
            return row
        ranks = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("rank*.json"))]
        for key in ("peak", "baseline", "step"):
            row[f"{key}_gib"] = round(max(r[f"{key}_bytes"] for r in ranks) / GIB, 3)
        state = json.loads((Path(tmp) / "run" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        tps = {e["step"]: e["tokens_per_s"] for e in state["log_history"] if "tokens_per_s" in e}
        last = max(tps)
        # Throughput logs the mean rate since training began: the steps after the first, from two of those means.
        step = n * args.grad_accum  # tokens per optimizer step (one sequence per micro-batch, data-parallel size 1)
        row["tokens_per_s"] = round((last - 1) * step / (last * step / tps[last] - step / tps[1]), 1) \
            if last > 1 else tps[1]
        return row


def longest(args, p: int, cache: dict) -> tuple[int | None, list[dict]]:
    """The longest N (a multiple of p) that fits at P = p: doubling from --start, then bisection."""
    def run(n):
        if (p, n) not in cache:
            cache[p, n] = measure(args, p, n, args.search_steps)
            print(json.dumps(cache[p, n]), flush=True)
        return cache[p, n]

    good, bad, n = None, None, args.start
    while n <= args.max_len:
        if run(n)["fits"]:
            good, n = n, n * 2
        else:
            bad = n
            break
    while good is not None and bad is not None and (bad - good) > args.resolution * good:
        mid = (good + bad) // 2 // args.multiple * args.multiple
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if run(mid)["fits"] else (good, mid)
    return good, [r for (q, _), r in sorted(cache.items()) if q == p]


def write_results(out: Path, args, same_n: list[dict], best: dict[int, int | None], runs: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sequence parallelism: P = 1 against P = 2 ({args.model}, {args.attention}, {args.deepspeed})", "",
             f"Command: `python scripts/bench_sp.py {' '.join(sys.argv[1:])}`", "",
             f"## One training step at N = {args.n}", "",
             "| P | tokens per process | peak per process (GiB) | added by training (GiB) | tokens/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['P']} | {r['tokens_per_process']} | {r.get('peak_gib', '-')} | {r.get('step_gib', '-')} | "
              f"{r.get('tokens_per_s', '-')} |" for r in same_n]
    lines += ["", f"## Longest N per process under {limit_words(args)}", ""]
    lines += [f"- P = {p}: {n if n is not None else 'none fits'}" for p, n in best.items()]
    if best.get(1) and best.get(2):
        lines.append(f"- ratio P=2 / P=1: {best[2] / best[1]:.2f} (target >= 1.8)")
    lines += ["", "Every run:", "", "```", *map(json.dumps, runs), "```"]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"same_n": same_n, "longest": best, "runs": runs}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, limit = ("step_gib", args.budget_gib) if args.budget_gib else ("peak_gib", args.limit_gib)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in sorted({r["P"] for r in runs}):
        pts = sorted((r["N"], r[key]) for r in runs if r["P"] == p and r["fits"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"P = {p}")
    ax.axhline(limit, color="gray", linestyle="--", label="limit")
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel("memory added by training per process (GiB)" if args.budget_gib else "peak per process (GiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


def limit_words(args) -> str:
    if args.budget_gib:
        return f"{args.budget_gib:g} GiB added by training (above each rank's memory when training begins)"
    return f"{args.limit_gib:g} GiB (absolute)"


def smoke_corpus(dest: Path) -> str:
    """A few stdlib modules as text: enough tokens for the smoke lengths, quick to tokenize."""
    import sysconfig

    dest.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
        (dest / (name + ".txt")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data/tiny-base"), help="HF model dir (heads divisible by 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="s2", choices=["s2", "full"])
    ap.add_argument("--ratio", type=float, default=0.25, help="S² group size / N")
    ap.add_argument("--group-size", type=int, default=None, help="a fixed S² group in tokens (overrides --ratio)")
    ap.add_argument("--data", default="builtin:python-stdlib")
    ap.add_argument("--deepspeed", default="configs/deepspeed/zero2.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="the P to compare")
    ap.add_argument("--n", type=int, default=16384, help="N of the same-N comparison")
    ap.add_argument("--steps", type=int, default=3, help="training steps of the same-N runs (step 1 is warm-up)")
    ap.add_argument("--search-steps", type=int, default=1, help="training steps of each run of the longest-N search")
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--limit-gib", type=float, default=None,
                       help="per-process memory limit of the longest-N search, absolute (default 8)")
    limit.add_argument("--budget-gib", type=float, default=None,
                       help="instead: the memory each process may add once training begins (its fixed cost apart)")
    ap.add_argument("--start", type=int, default=16384, help="first N of the search")
    ap.add_argument("--max-len", type=int, default=2**21, help="the search stops here")
    ap.add_argument("--resolution", type=float, default=0.05, help="bisect until (bad - good) / good is below")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", type=Path, default=None, help="markdown results (json and png beside it)")
    ap.add_argument("--smoke", action="store_true", help="tiny lengths, a small corpus, results in a temp dir")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not args.budget_gib:
        args.limit_gib = args.limit_gib or 8.0
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sp_smoke_")
        args.data = smoke_corpus(Path(tmp.name) / "corpus")
        args.n = args.start = args.max_len = 128
        args.steps = 2
        args.out = args.out or Path(tmp.name) / "sp.md"
    args.grad_accum = max(args.sizes)  # the same for every P; SP needs a multiple of P (resume, config_problems)
    # N stays divisible by every P and by S²'s group (ratio 1/4 -> even; a fixed group -> a multiple of it)
    args.multiple = math.lcm(max(args.sizes) * 8, args.group_size or 1)
    cache: dict = {}
    same_n = []
    for p in args.sizes:
        cache[p, args.n] = measure(args, p, args.n, args.steps)
        print(json.dumps(cache[p, args.n]), flush=True)
        same_n.append(cache[p, args.n])
    best = {}
    for p in args.sizes:
        best[p], _ = longest(args, p, cache)
    runs = [cache[k] for k in sorted(cache)]
    if args.out:
        write_results(args.out, args, same_n, best, runs)
        print(f"results in {args.out}")
    if tmp is not None:
        print(args.out.read_text())
        tmp.cleanup()


if __name__ == "__main__":
    main()
