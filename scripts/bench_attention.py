"""Forward + backward of the attention alone on the CPU: S2 against its linear limit and against full causal.

    python scripts/bench_attention.py --lengths 2048 4096 8192 16384 --out benchmarks/attention.md

For each N (G = N/4, H heads of dim D, batch 1), three timings taken side by side, interleaved, best of --repeats:
  s2          longctx's S2 attention (training mode, the uniform path a packed pretraining batch takes)
  limit       (N/G) x the time of one full causal attention over G tokens: the work S2 does, at best speed
  full        full causal attention over N tokens (SDPA is_causal)
Peak memory: each (method, N) runs once more in a fresh process; the figure is the peak resident memory during
the call (sampled from /proc/self/statm every 0.2 ms) minus the resident memory right before it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longctx.attention import S2Settings, s2_attention_forward  # noqa: E402


class _Module(torch.nn.Module):
    """Stands in for a transformers attention module: S2 reads `training` and `s2_settings` from it."""

    def __init__(self, ratio: float):
        super().__init__()
        self.s2_settings = S2Settings(group_size_ratio=ratio)
        self.num_key_value_groups = 1
        self.train()


def _inputs(n: int, heads: int, dim: int):
    # [B, T, H, D] projections viewed as [B, H, T, D], as transformers hands them to the attention function
    return [torch.randn(1, n, heads, dim).transpose(1, 2).requires_grad_() for _ in range(3)]


def run_once(method: str, n: int, heads: int, dim: int, ratio: float) -> float:
    q, k, v = _inputs(n, heads, dim)
    g = int(n * ratio)
    t0 = time.perf_counter()
    if method == "s2":
        out, _ = s2_attention_forward(_Module(ratio), q, k, v, None, scaling=dim ** -0.5)
        out.sum().backward()
    elif method == "limit":  # one causal block of G tokens, timed, then counted N/G times
        qg, kg, vg = (x[:, :, :g].detach().contiguous().requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward()
        return (time.perf_counter() - t0) * (n // g)
    else:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


_PEAK_SCRIPT = """
import sys, threading, time
sys.path.insert(0, {here!r})
import bench_attention as b
b.run_once({method!r}, 512, {heads}, {dim}, {ratio})
base = b._rss_bytes(); peak = [base]; done = [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], b._rss_bytes()); time.sleep(0.0002)
t = threading.Thread(target=watch); t.start()
b.run_once({method!r}, {n}, {heads}, {dim}, {ratio}); done[0] = True; t.join()
print((peak[0] - base) / 2**20)
"""


def peak_memory_mb(method: str, n: int, heads: int, dim: int, ratio: float) -> float:
    """Peak RSS growth during one call, in a fresh process (so earlier runs leave no cached blocks behind)."""
    code = _PEAK_SCRIPT.format(here=str(Path(__file__).parent), method=method, n=n, heads=heads, dim=dim,
                               ratio=ratio)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table (and .json beside it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_once("s2", 512, args.heads, args.dim, args.ratio)  # warm up kernels

    rows = []
    for n in args.lengths:
        best = {m: float("inf") for m in ("s2", "limit", "full")}
        for _ in range(args.repeats):  # interleaved, so load changes on this shared machine hit all three alike
            for m in best:
                best[m] = min(best[m], run_once(m, n, args.heads, args.dim, args.ratio))
        mem = {m: peak_memory_mb(m, n, args.heads, args.dim, args.ratio) for m in ("s2", "full")}
        row = {"N": n, "G": int(n * args.ratio), **{f"{m}_s": round(t, 4) for m, t in best.items()},
               "s2_over_limit": round(best["s2"] / best["limit"], 3),
               "full_over_s2": round(best["full"] / best["s2"], 2),
               "s2_peak_mb": round(mem["s2"], 1), "full_peak_mb": round(mem["full"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.out:
        cmd = "python " + " ".join(sys.argv)
        head = (f"# S2 attention: forward + backward, CPU\n\nCommand: `{cmd}`  \n"
                f"Machine: {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
                f"torch {torch.__version__}, {date.today()}; B=1, H={args.heads}, D={args.dim}, float32, "
                f"G = {args.ratio} N, best of {args.repeats} interleaved runs.\n\n"
                "| N | G | S2 s | limit s ((N/G) x causal@G) | full causal s | S2 / limit | full / S2 | S2 peak MB | full peak MB |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        lines = [f"| {r['N']} | {r['G']} | {r['s2_s']} | {r['limit_s']} | {r['full_s']} | {r['s2_over_limit']} | "
                 f"{r['full_over_s2']} | {r['s2_peak_mb']} | {r['full_peak_mb']} |" for r in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(head + "\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
