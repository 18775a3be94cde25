"""Sequence parallelism (issue 12): per-process peak memory and tokens/s of training steps at P = 1 and P = 2 for
the same N, and the longest N that fits per process under one per-process memory limit.

    python scripts/bench_sp.py --out benchmarks/sp.md                     # the lead's run, on a quiet machine
    python scripts/bench_sp.py --smoke                                    # a minute: checks that it runs

Every measurement is a real `longctx train` (train.py's code path: Trainer, DeepSpeed ZeRO-2, S², the chunked SP
loss) launched with `torchrun --nproc_per_node P`, P = 1 included, so both sides pay the same engine. Each rank
reports its own peak: max RSS on the CPU (ru_maxrss), `torch.cuda.max_memory_allocated` on a GPU. The limit is
enforced inside each rank (a watchdog thread exits the rank when its RSS crosses --limit-gib on the CPU;
`torch.cuda.set_per_process_memory_fraction` on a GPU), so "does not fit" never wakes the kernel's OOM killer.
tokens/s is the steady rate of steps 2..S (step 1 includes warm-up), from the Throughput callback's log.

The longest N per P: double N from --start until a run fails or passes --max-len, then bisect between the last
fit and the first failure down to --resolution. Target (issue 12): P = 2 fits at least 1.8x the tokens of P = 1.
Not measured here: DeepSpeed's TiledMLP and tiled logits loss (longctx's chunked loss already keeps one chunk of
logits; the MLP's [N, I] intermediates are what TiledMLP would cut).
"""

from __future__ import annotations

import argparse
import json
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

def _rss_watchdog(limit: int) -> None:
    """Exit this rank (code 3) as soon as its RSS crosses `limit` bytes: the run then "does not fit"."""
    def watch():
        while True:
            try:
                with open("/proc/self/status") as f:
                    rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                rss = 0
            if rss > limit:
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def worker(spec: dict) -> None:
    import resource

    import torch

    from longctx import dist
    from longctx.config import load_config
    from longctx.trainer import train

    limit = int(spec["limit_gib"] * GIB) if spec.get("limit_gib") else None
    if limit and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, limit / torch.cuda.get_device_properties(dist.local_rank()).total_memory), dist.local_rank())
    elif limit:
        _rss_watchdog(limit)
    train(load_config(data=spec["config"]))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["out"], f"rank{dist.rank()}.json").write_text(json.dumps({"peak_bytes": peak}))


def run_config(args, n: int) -> dict:
    steps = args.steps
    return {
        "model": {"name_or_path": args.model, "dtype": args.dtype},
        "attention": {"type": args.attention, "group_size_ratio": args.ratio},
        "data": {"train": args.data, "num_proc": 1},
        "train": {"output_dir": "", "seq_len": n, "max_steps": steps, "save_steps": steps, "logging_steps": 1,
                  "per_device_train_batch_size": 1, "gradient_accumulation_steps": args.grad_accum, "warmup_steps": 0,
                  "gradient_checkpointing": True, "deepspeed": str(ROOT / args.deepspeed), "resume": "off",
                  "bf16": args.dtype == "bfloat16"},
    }


def measure(args, p: int, n: int) -> dict:
    """One run of `args.steps` steps at P = p, N = n: {"fits", "peak_gib" (max over ranks), "tokens_per_s"}."""
    with tempfile.TemporaryDirectory(prefix="bench_sp_") as tmp:
        cfg = run_config(args, n)
        cfg["train"]["output_dir"] = str(Path(tmp) / "run")
        cfg["train"]["sequence_parallel_size"] = p
        spec = {"config": cfg, "out": tmp, "limit_gib": args.limit_gib}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(p),
               "--master_port", str(29500 + os.getpid() % 1000), str(Path(__file__).resolve()), "--worker",
               json.dumps(spec)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # slow, not out of memory: said in the row, so the search's bound shows it
            return {"P": p, "N": n, "tokens_per_process": n // p, "fits": False, "wall_s": args.timeout,
                    "why": f"timed out after {args.timeout:g} s (not a memory failure; raise --timeout)"}
        row = {"P": p, "N": n, "tokens_per_process": n // p, "fits": proc.returncode == 0,
               "wall_s": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("=")]
            row["why"] = next((line for line in lines if "train." in line or "Error" in line), lines[-1] if lines
                              else f"exit {proc.returncode}")[-300:]
            return row
        peaks = [json.loads(f.read_text())["peak_bytes"] for f in sorted(Path(tmp).glob("rank*.json"))]
        row["peak_gib"] = round(max(peaks) / GIB, 3)
        state = json.loads((Path(tmp) / "run" / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
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
            cache[p, n] = measure(args, p, n)
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
             "| P | tokens per process | peak per process (GiB) | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['P']} | {r['tokens_per_process']} | {r.get('peak_gib', '-')} | {r.get('tokens_per_s', '-')} |"
              for r in same_n]
    lines += ["", f"## Longest N per process under {args.limit_gib} GiB", ""]
    lines += [f"- P = {p}: {n if n is not None else 'none fits'}" for p, n in best.items()]
    if best.get(1) and best.get(2):
        lines.append(f"- ratio P=2 / P=1: {best[2] / best[1]:.2f} (target >= 1.8)")
    lines += ["", "Every run:", "", "```", *map(json.dumps, runs), "```"]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"same_n": same_n, "longest": best, "runs": runs}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in sorted({r["P"] for r in runs}):
        pts = sorted((r["N"], r["peak_gib"]) for r in runs if r["P"] == p and r["fits"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"P = {p}")
    if args.limit_gib:
        ax.axhline(args.limit_gib, color="gray", linestyle="--", label="limit")
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel("peak per process (GiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


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
    ap.add_argument("--data", default="builtin:python-stdlib")
    ap.add_argument("--deepspeed", default="configs/deepspeed/zero2.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="the P to compare")
    ap.add_argument("--n", type=int, default=16384, help="N of the same-N comparison")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (step 1 is warm-up)")
    ap.add_argument("--limit-gib", type=float, default=8.0, help="per-process memory limit of the longest-N search")
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
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sp_smoke_")
        args.data = smoke_corpus(Path(tmp.name) / "corpus")
        args.n = args.start = args.max_len = 128
        args.steps, args.limit_gib = 2, args.limit_gib or 8.0
        args.out = args.out or Path(tmp.name) / "sp.md"
    args.grad_accum = max(args.sizes)  # the same for every P; SP needs a multiple of P (resume, config_problems)
    args.multiple = max(args.sizes) * 8  # N stays divisible by every P and by S²'s group (ratio 1/4 -> even)
    cache: dict = {}
    same_n = []
    for p in args.sizes:
        cache[p, args.n] = measure(args, p, args.n)
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
