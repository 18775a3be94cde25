"""One training step of a small Llama on the CPU: tokens/s, peak RSS and MFU, S2 against full attention.

    python scripts/bench_train.py --lengths 2048 4096 8192 16384 --out benchmarks/train.md

The model: a randomly initialised Llama (default 8 layers, hidden 512, 8 heads, MLP 1408, vocab 32000, untied
head), trained the LongLoRA+ way (LoRA r8 on q/k/v/o plus trainable embeddings and norms) through longctx's
Trainer with the chunked loss, batch 1. For each N, four configurations side by side, each in a fresh process
(benchlib.run_worker): S2 (G = N/4) and full causal attention (transformers' SDPA), each with and without
gradient checkpointing. A warm-up step at 512 tokens precedes the timed step (kernels, allocator, the optimizer's
states).

MFU = model FLOPs of the step / (step seconds x fp32 matmul peak), the peak measured in the same run (benchlib).
Model FLOPs, counted by `step_flops` (PaLM appendix B conventions): 2 FLOPs per multiply-add; every linear's
forward, the gradient of its input (every layer needs it: the embeddings train) and the gradient of its weight
only where it trains (LoRA, full fine-tuning); attention QK^T and PV over the keys a query attends to (S2: its
group, causal; full: all earlier tokens), backward twice the forward. Recomputation under checkpointing is not
model FLOPs, so a checkpointed step shows a lower MFU for the same work.

The planner's prediction (longctx.plan, device cpu) is printed beside every measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

CONFIGS = [("s2", False), ("full", False), ("s2", True), ("full", True)]  # (attention, gradient checkpointing)


def model_config(args, n: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=n, tie_word_embeddings=False)


def step_flops(cfg, n: int, attention: str, full_ft: bool, lora_r: int, ratio: float) -> float:
    """Model FLOPs of one training step at batch 1 (see the module docstring for what counts)."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + v * h  # q, o; k, v; gate, up, down; lm_head
    lora = layers * 4 * lora_r * 2 * h if not full_ft else 0  # A [r, h] and B [h, r] on q, k, v, o (kv <= h)
    trained_weights = linear if full_ft else lora
    matmul = 2 * n * (linear + lora) * 2 + 2 * n * trained_weights  # forward + input grads, weight grads
    span = n * ratio if attention == "s2" else n  # keys in view: the group, or the whole sequence
    attn_forward = layers * 2 * 2 * n * (span / 2) * h  # QK^T and PV, causal: half the span on average
    return matmul + 3 * attn_forward


def worker(spec: dict) -> None:
    import torch

    from longctx import apply
    from longctx.model import add_lora, prepare_for_training

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    args = argparse.Namespace(**spec)
    n = spec["n"]
    model = LlamaForCausalLM(model_config(args, n))
    if spec["attention"] == "s2":
        apply(model, attention={"type": "s2", "group_size_ratio": spec["ratio"]})
    if spec["full_ft"]:
        prepare_for_training(model, spec["ckpt"])
    else:
        model = add_lora(model, r=spec["lora_r"], gradient_checkpointing=spec["ckpt"])
    trainer = benchlib.make_trainer(model, chunked_loss=True)

    def batch(length):
        ids = torch.randint(0, spec["vocab"], (1, length))
        return {"input_ids": ids, "labels": ids.clone()}

    benchlib.train_step(trainer, batch(min(512, n)))
    rss_before = benchlib.peak_rss_bytes()
    seconds = min(benchlib.train_step(trainer, batch(n)) for _ in range(spec["repeats"]))
    benchlib.report({"step_s": seconds, "peak_rss": benchlib.peak_rss_bytes(), "rss_after_warmup": rss_before})


def predicted_peak(args, n: int, attention: str, ckpt: bool) -> int:
    """longctx.plan's estimate for the same step on the CPU."""
    from longctx import plan

    est = plan.estimate(model_config(args, n), seq_len=n, lora=not args.full_ft, lora_r=args.lora_r,
                        gradient_checkpointing=ckpt, attention="s2" if attention == "s2" else "sdpa",
                        group_size=int(n * args.ratio),
                        chunked_loss=True, device="cpu")
    return est.total


def write_results(rows: list[dict], args, peak: float, out: Path) -> None:
    cmd = "python " + " ".join(sys.argv)
    mode = "full fine-tuning" if args.full_ft else f"LoRA r{args.lora_r} (q/k/v/o) + trainable embed/norm"
    head = (f"# Training step on the CPU: S2 against full attention\n\nCommand: `{cmd}`  \n"
            f"Machine: {benchlib.machine()}  \n"
            f"Model: Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate}, "
            f"vocab {args.vocab}, float32, batch 1, {mode}, chunked loss, AdamW; S2 G = {args.ratio} N.  \n"
            f"fp32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s (best 2048^3 matmul, start and end).  \n"
            "MFU: model FLOPs (no recomputation) / (step time x peak); see scripts/bench_train.py for the count. "
            "Peak RSS: the whole process (ru_maxrss), model and optimizer included"
            + (f", glibc MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} in the workers" if args.mmap_threshold else "")
            + "; planned: `longctx.plan` estimate for the same step.\n\n"
            "| N | attention | ckpt | step s | tokens/s | MFU | peak RSS GiB | planned GiB | planned / measured |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        planned = f"{r['planned'] / 2**30:.2f}" if r.get("planned") else "-"
        ratio = f"{r['planned'] / r['peak_rss']:.2f}" if r.get("planned") else "-"
        lines.append(f"| {r['n']} | {r['attention']} | {'yes' if r['ckpt'] else 'no'} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_rss'] / 2**30:.2f} | {planned} | "
                     f"{ratio} |")
    speedups = []
    for n in sorted({r["n"] for r in rows}):
        for ckpt in (False, True):
            by = {r["attention"]: r for r in rows if r["n"] == n and r["ckpt"] == ckpt}
            if {"s2", "full"} <= by.keys():
                speedups.append(f"| {n} | {'yes' if ckpt else 'no'} | "
                                f"{by['s2']['tokens_per_s'] / by['full']['tokens_per_s']:.2f} |")
    tail = "\n\n## S2 tokens/s over full attention tokens/s\n\n| N | ckpt | S2 / full |\n|---|---|---|\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + "\n".join(lines) + tail + "\n".join(speedups) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "machine": benchlib.machine(),
                                                    "matmul_peak_flops": peak, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for attention, ckpt in CONFIGS:
        sel = sorted((r for r in rows if r["attention"] == attention and r["ckpt"] == ckpt), key=lambda r: r["n"])
        if not sel:
            continue
        label = f"{attention}{' + ckpt' if ckpt else ''}"
        style = "-" if attention == "s2" else "--"
        ax1.plot([r["n"] for r in sel], [r["tokens_per_s"] for r in sel], style, marker="o", label=label)
        ax2.plot([r["n"] for r in sel], [r["peak_rss"] / 2**30 for r in sel], style, marker="o", label=label)
    for ax, ylabel in ((ax1, "tokens/s"), (ax2, "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("One training step on the CPU: S2 vs full attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ratio", type=float, default=0.25, help="S2 group size / N")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--full-ft", action="store_true", help="train every weight instead of LoRA + embed/norm")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per configuration (best is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for the workers (bytes): freed blocks above it go back to the "
                         "OS at once, so peak RSS tracks live tensors instead of the heap's high-water mark")
    ap.add_argument("--out", type=Path, default=None, help="markdown results (json and png beside it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import os

    import torch
    from tqdm import tqdm

    args.threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.threads)
    peak = benchlib.matmul_peak_flops()
    rows = []
    plan = [(n, attention, ckpt) for n in args.lengths for attention, ckpt in CONFIGS]
    for n, attention, ckpt in tqdm(plan, desc="bench_train", unit="run"):
        spec = {**{k: v for k, v in vars(args).items() if k not in ("out", "worker", "lengths", "mmap_threshold")},
                "n": n, "attention": attention, "ckpt": ckpt}
        env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
        r = benchlib.run_worker([__file__, "--worker", json.dumps(spec)], env=env)
        flops = step_flops(model_config(args, n), n, attention, args.full_ft, args.lora_r, args.ratio)
        row = {"n": n, "attention": attention, "ckpt": ckpt, "step_s": r["step_s"], "tokens_per_s": n / r["step_s"],
               "flops": flops, "peak_rss": r["peak_rss"], "rss_after_warmup": r["rss_after_warmup"],
               "planned": predicted_peak(args, n, attention, ckpt)}
        rows.append(row)
        tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    peak = max(peak, benchlib.matmul_peak_flops())  # the best of start and end: the machine is shared
    for row in rows:
        row["mfu"] = row["flops"] / (row["step_s"] * peak)
    if args.out:
        write_results(rows, args, peak, args.out)
    for row in rows:
        print(f"N={row['n']:>6} {row['attention']:>4} ckpt={row['ckpt']!s:>5}  {row['tokens_per_s']:8.0f} tok/s  "
              f"MFU {100 * row['mfu']:5.1f}%  peak {row['peak_rss'] / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
