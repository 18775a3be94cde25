"""Quality benchmark (issue 6 §1): does context extension work on data/tiny-base (trained at 256 tokens)?

    python scripts/bench_quality.py                     # every arm, then benchmarks/quality.{json,md,png}
    python scripts/bench_quality.py --arms a,b,c-yarn   # a subset: names, or a letter for its whole group

Arms (ARMS below): (a) the base with no scaling; (b) training-free linear/ntk/dynamic/yarn at factors 4 and 8;
(g) the training-free methods of longctx/methods on the base (consistent dynamic NTK x4/x8, ReRoPE, leaky ReRoPE,
log-n, ReRoPE + log-n as Su runs it, NBCE); (h) an ALiBi base (--alibi-model: BLOOM or MPT; skipped without it)
as it is, with NTK-ALiBi a = 2, 4 and dynamic NTK-ALiBi;
fine-tuned 256 -> 1024 from configs/quickstart.yaml, all with the same token budget (--train-tokens) and the
quickstart's lr, schedule and seed: (c) LongLoRA (S² + LoRA + embed/norm) under linear and under yarn, (d) the same
with full attention, (e) S² + plain LoRA (no embed/norm), (f) S² + full fine-tuning (at --full-ft-lr, a quarter of
the quickstart's LoRA rate). Every arm is measured the same way: perplexity at --lengths on the stdlib
validation split (--eval-tokens scored tokens per length, non-overlapping windows, longctx.evaluate.perplexity)
and passkey retrieval (longctx.evaluate.passkey). Then the extras of issue 14 §4, stored apart in
OUT/extras/ARM.json (so that arms measured before them keep their numbers): the RULER tasks of longctx/tasks.py
(--tasks at --task-lengths) and the per-position loss (longctx/position_loss.py) over --position-docs validation
documents of --position-length tokens, plotted in OUT-position.png.

Resumable: each arm's result goes to OUT/ARM.json as soon as it is done, with the settings that produced it; a
rerun skips arms whose settings match (--force redoes them) and refuses to mix arms measured otherwise. Training
runs go to RUNS/ARM (a finished final/ with the same config is reused). After every arm the report is rewritten:
OUT.json (everything), OUT.md (command, machine, table, claims) and OUT.png (PPL vs length).
The claims of the issue are judged from the numbers by the thresholds below, never written by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

import longctx
from longctx import evaluate as ev
from longctx import model as model_lib
from longctx import position_loss as pl
from longctx import tasks as task_lib
from longctx.config import Config, ConfigError, load_config
from longctx.sweep import train_stats
from longctx.trainer import train

log = logging.getLogger("longctx")


# ---------------------------------------------------------------------------------------------------------------
# The arms: pure data. `attention` None = training-free (evaluated on the base with `rope` x `factor` and the
# `methods`, applied in order: `longctx eval --method` takes the first, log-n wraps it); "s2" or "full" = fine-tuned
# from --config with rope.rope_type = `rope` (its factor stays the config's: target / original). `alibi`: on the
# --alibi-model base instead of the config's.

@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    rope: str
    factor: float | None = None
    attention: str | None = None
    lora: bool = True
    embed_norm: bool = True
    methods: tuple[dict, ...] = ()
    alibi: bool = False

    @property
    def trains(self) -> bool:
        return self.attention is not None


ARMS: tuple[Arm, ...] = (
    Arm("a", "base, no scaling (direct extrapolation)", "none"),
    *(Arm(f"b-{t}{f}", f"training-free {t} x{f}", t, float(f)) for t in ("linear", "ntk", "dynamic", "yarn")
      for f in (4, 8)),
    Arm("c-linear", "LongLoRA: S² + LoRA + embed/norm", "linear", attention="s2"),
    Arm("c-yarn", "LongLoRA: S² + LoRA + embed/norm", "yarn", attention="s2"),
    Arm("d-linear", "full attention + LoRA + embed/norm", "linear", attention="full"),
    Arm("d-yarn", "full attention + LoRA + embed/norm", "yarn", attention="full"),
    Arm("e-yarn", "S² + plain LoRA (no embed/norm)", "yarn", attention="s2", embed_norm=False),
    Arm("f-yarn", "S² + full fine-tuning", "yarn", attention="s2", lora=False),
    *(Arm(f"g-cdyn{f}", f"consistent dynamic NTK x{f}", "none", methods=({"name": "consistent_dynamic", "factor": f},))
      for f in (4, 8)),
    Arm("g-rerope", "ReRoPE (window: original / 4)", "none", methods=({"name": "rerope"},)),
    Arm("g-leaky", "leaky ReRoPE (window: original / 4, leak 16)", "none", methods=({"name": "leaky_rerope"},)),
    Arm("g-logn", "log-n query scaling", "none", methods=({"name": "logn"},)),
    Arm("g-rerope-logn", "ReRoPE + log-n (Su's patch)", "none", methods=({"name": "rerope"}, {"name": "logn"})),
    Arm("g-nbce", "NBCE (chunk: original / 2, beta 0.25, min entropy)", "none", methods=({"name": "nbce"},)),
    Arm("h-alibi", "ALiBi base, no scaling", "none", alibi=True),
    *(Arm(f"h-ntk-alibi{a}", f"NTK-ALiBi a = {a}", "none", methods=({"name": "ntk_alibi", "alpha": a},), alibi=True)
      for a in (2, 4)),
    Arm("h-dyn-ntk-alibi", "dynamic NTK-ALiBi", "none", methods=({"name": "dynamic_ntk_alibi"},), alibi=True),
)
ARM_BY_NAME = {a.name: a for a in ARMS}


def select_arms(text: str) -> list[Arm]:
    """'all', or comma-separated arm names and group letters ('b' = every b-* arm), in ARMS order."""
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w != "all" and w not in ARM_BY_NAME
               and not any(a.name.split("-")[0] == w for a in ARMS)]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; valid: all, "
                                         f"a group letter a-h, or {', '.join(ARM_BY_NAME)}")
    return [a for a in ARMS if "all" in wanted or a.name in wanted or a.name.split("-")[0] in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Claims of the issue, judged from the numbers. Each claim is a list of checks, each True (supports), False
# (contradicts) or None (between the thresholds); all True = CONFIRMED, all False = REFUTED, else MIXED; no check
# possible (arms missing) = NOT MEASURED. "Original" is the base's trained length (256), "target" the fine-tuning
# length (1024), "long" every evaluated length above the original.

COLLAPSE = 2.0        # (1) base PPL@longest / PPL@original >= this: collapsed ...
NO_COLLAPSE = 1.25    #     ... <= this: held
DEGRADE = 1.10        # (2) PI degrades: even its best PPL at any length is >= this x the base's PPL@original
#                       (3) NTK/YaRN hold better: geometric-mean PPL over the long lengths below both PI's at the
#                           same factor and the base's (strictly)
FT_TOLERANCE = 1.02   # (4) after fine-tuning PPL@target <= this x PPL@original (2% for window-to-window noise)
S2_CLOSE = 0.05       # (5) |PPL_S² / PPL_full - 1| at the target <= this: close ...
S2_FAR = 0.10         #     ... > this: not close
EMBED_NORM = 1.05     # (6) PPL@target of plain LoRA / LongLoRA (with embed/norm) >= this: embed/norm matter ...
NO_EMBED_NORM = 1.01  #     ... <= this: they do not


def ppl_at(res: dict, arm: str, length: int) -> float | None:
    rows = res.get(arm, {}).get("ppl", [])
    return next((r["ppl"] for r in rows if r["length"] == length), None)


def long_ppl(res: dict, arm: str, original: int) -> float | None:
    """Geometric mean of the arm's PPL over the evaluated lengths above the original length."""
    vals = [r["ppl"] for r in res.get(arm, {}).get("ppl", []) if r["length"] > original]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def _band(value: float, yes: float, no: float) -> bool | None:
    return True if value >= yes else False if value <= no else None


def claim_extrapolation_collapses(res, original, target):
    base0, rows = ppl_at(res, "a", original), [r for r in res.get("a", {}).get("ppl", []) if r["length"] > original]
    if base0 is None or not rows:
        return []
    longest = max(rows, key=lambda r: r["length"])
    r = longest["ppl"] / base0
    steps = ", ".join(f"@{x['length']} {x['ppl']:.2f}" for x in rows)
    return [(f"(a) PPL@{longest['length']} / PPL@{original} = {longest['ppl']:.2f} / {base0:.2f} = {r:.2f} "
             f"(collapse >= {COLLAPSE}, held <= {NO_COLLAPSE}; {steps})", _band(r, COLLAPSE, NO_COLLAPSE))]


def claim_pi_degrades(res, original, target):
    base0, out = ppl_at(res, "a", original), []
    for f in (4, 8):
        rows = res.get(f"b-linear{f}", {}).get("ppl", [])
        if base0 is None or not rows:
            continue
        best = min(rows, key=lambda r: r["ppl"])
        r = best["ppl"] / base0
        out.append((f"linear x{f}: best PPL {best['ppl']:.2f} (@{best['length']}) / (a) PPL@{original} "
                    f"{base0:.2f} = {r:.2f} (degraded >= {DEGRADE})", r >= DEGRADE))
    return out


def claim_ntk_yarn_hold_better(res, original, target):
    out = []
    for t in ("ntk", "yarn"):
        for f in (4, 8):
            x, pi, base = (long_ppl(res, a, original) for a in (f"b-{t}{f}", f"b-linear{f}", "a"))
            if None in (x, pi, base):
                continue
            out.append((f"{t} x{f}: geometric-mean PPL over lengths > {original} {x:.2f} vs linear x{f} {pi:.2f} "
                        f"and (a) {base:.2f}",
                        x < min(pi, base)))
    return out


def claim_finetuned_flat(res, original, target):
    out = []
    for arm in (a.name for a in ARMS if a.trains):
        p0, p1 = ppl_at(res, arm, original), ppl_at(res, arm, target)
        if None not in (p0, p1):
            out.append((f"{arm}: PPL@{target} / PPL@{original} = {p1:.2f} / {p0:.2f} = {p1 / p0:.3f} "
                        f"(<= {FT_TOLERANCE})", p1 <= FT_TOLERANCE * p0))
    return out


def claim_s2_matches_full(res, original, target):
    out = []
    for rope in ("linear", "yarn"):
        s2, full = ppl_at(res, f"c-{rope}", target), ppl_at(res, f"d-{rope}", target)
        if None not in (s2, full):
            d = abs(s2 / full - 1)
            out.append((f"{rope}: PPL@{target} S² (c) {s2:.2f} vs full (d) {full:.2f}, |ratio - 1| = {d:.3f} "
                        f"(close <= {S2_CLOSE}, not > {S2_FAR})", True if d <= S2_CLOSE else
                        False if d > S2_FAR else None))
    return out


def claim_embed_norm_matter(res, original, target):
    plain, plus, full = (ppl_at(res, a, target) for a in ("e-yarn", "c-yarn", "f-yarn"))
    if None in (plain, plus):
        return []
    r = plain / plus
    ref = f"; full fine-tuning (f) {full:.2f}" if full is not None else ""
    return [(f"PPL@{target} plain LoRA (e) {plain:.2f} / LongLoRA (c-yarn) {plus:.2f} = {r:.3f} (matter >= "
             f"{EMBED_NORM}, not <= {NO_EMBED_NORM}){ref}", _band(r, EMBED_NORM, NO_EMBED_NORM))]


def claim_methods_hold(res, original, target):
    base = long_ppl(res, "a", original)
    out = []
    for arm in (a.name for a in ARMS if a.methods and not a.alibi):
        x = long_ppl(res, arm, original)
        if None not in (x, base):
            out.append((f"{arm}: geometric-mean PPL over lengths > {original} {x:.2f} vs (a) {base:.2f}", x < base))
    return out


CLAIMS = (
    ("Direct extrapolation collapses past the trained length", claim_extrapolation_collapses, "a"),
    ("Position interpolation (linear) without fine-tuning degrades", claim_pi_degrades, "a, b-linear4/8"),
    ("NTK and YaRN without fine-tuning hold better", claim_ntk_yarn_hold_better, "a, b-linear/ntk/yarn 4/8"),
    ("After fine-tuning, PPL at the target length is at most that at the original", claim_finetuned_flat,
     "any of c-f"),
    ("S²-Attn matches full attention closely", claim_s2_matches_full, "c-linear + d-linear or c-yarn + d-yarn"),
    ("Embed/norm training matters for LoRA (LongLoRA Table 2)", claim_embed_norm_matter, "c-yarn, e-yarn"),
    ("Training-free methods hold better than direct extrapolation", claim_methods_hold, "a, any of g"),
)


def judge(res: dict, original: int, target: int) -> list[dict]:
    out = []
    for title, fn, needs in CLAIMS:
        checks = fn(res, original, target)
        outcomes = [ok for _, ok in checks]
        verdict = ("NOT MEASURED" if not checks else "CONFIRMED" if all(o is True for o in outcomes)
                   else "REFUTED" if all(o is False for o in outcomes) else "MIXED")
        out.append({"claim": title, "verdict": verdict, "checks": [t for t, _ in checks],
                    "outcomes": outcomes, "needs": needs})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stages: config -> train -> evaluate -> store

def tokens_per_step(cfg: Config) -> int:
    t = cfg.train
    return t.seq_len * t.per_device_train_batch_size * t.gradient_accumulation_steps


def train_overrides(arm: Arm, args, base: Config) -> list[str]:
    """The dotted overrides of --config that make `arm`'s training run (all but the output directory)."""
    steps = max(1, math.ceil(args.train_tokens / tokens_per_step(base)))
    over = [f"rope.rope_type={arm.rope}", f"attention.type={arm.attention}", f"lora.enabled={arm.lora}",
            f"lora.trainable_params={'[embed, norm]' if arm.embed_norm else '[]'}", f"train.max_steps={steps}",
            f"train.save_steps={max(1, steps // 2)}", "eval.lengths=[]"]
    return over + ([] if arm.lora else [f"train.learning_rate={args.full_ft_lr}"])


def arm_config(arm: Arm, args, base: Config) -> Config:
    return load_config(args.config, overrides=train_overrides(arm, args, base) +
                       [f"train.output_dir={Path(args.runs) / arm.name}"])


def arm_settings(arm: Arm, args, base: Config) -> dict:
    """Everything that changes an arm's numbers: a stored arm is reused only when these are equal."""
    s = {"config": str(args.config), "model": base.model.name_or_path, "lengths": args.lengths,
         "eval_tokens": args.eval_tokens, "passkey": {"lengths": args.passkey_lengths, "depths": args.passkey_depths,
                                                      "trials": args.passkey_trials, "seed": args.seed}}
    if arm.trains:
        s["train"] = {"tokens": args.train_tokens, "overrides": train_overrides(arm, args, base)}
    else:
        s["rope"] = rope_dict(arm, base)
    if arm.methods:  # (only then: arms measured before methods existed keep their settings)
        s["methods"] = list(arm.methods)
    if arm.alibi:
        s["model"] = args.alibi_model
    return json.loads(json.dumps(s))


def rope_dict(arm: Arm, base: Config) -> dict | None:
    """Training-free rope overrides, as `longctx eval --rope` gives them."""
    if arm.rope == "none":
        return None
    return {"rope_type": arm.rope, "factor": arm.factor,
            "original_max_position_embeddings": original_length(base)}


def original_length(base: Config) -> int:
    if getattr(base.rope, "original_max_position_embeddings", None):
        return base.rope.original_max_position_embeddings
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base.model.name_or_path).max_position_embeddings


def is_finished(path: Path, settings: dict, force: bool) -> bool:
    if force or not path.is_file():
        return False
    saved = json.loads(path.read_text()).get("settings")
    if saved != settings:
        diff = sorted(k for k in set(saved or {}) | set(settings) if (saved or {}).get(k) != settings.get(k))
        raise ConfigError(f"{path} was measured with other settings ({', '.join(diff)} differ); pass --force to "
                          "redo it, or use another --out")
    return True


def train_arm(cfg: Config, force: bool) -> tuple[Path, dict]:
    """RUN/final (trained now, or reused when the run has the same config) and {wall_s, loss, tokens_per_s}."""
    run = Path(cfg.train.output_dir)
    saved = run / "config.yaml"
    if saved.is_file() and saved.read_text() != cfg.to_yaml():
        if not force:
            raise ConfigError(f"{run} holds a run with another config; pass --force to retrain it, or use another "
                              "--runs")
        shutil.rmtree(run)
    record = run / "bench_train.json"
    if (run / "final" / "longctx.json").is_file():
        log.info("%s: reusing the finished run", run)
        stats = json.loads(record.read_text()) if record.is_file() else {"wall_s": None, **train_stats(run)}
        return run / "final", stats
    t0 = time.perf_counter()
    final = train(cfg)
    if final.name != "final":
        raise RuntimeError(f"{run}: training stopped early (preempted); rerun to resume it")
    stats = {"wall_s": round(time.perf_counter() - t0, 1), **train_stats(run)}
    record.write_text(json.dumps(stats, indent=1))
    return final, stats


def count_trainable(cfg: Config) -> tuple[int, int]:
    """(trainable, total) parameters of the model as `train` builds it."""
    m = model_lib.load_model(cfg.model.name_or_path, dtype=cfg.model.dtype)
    if cfg.lora.enabled:
        m = model_lib.add_lora(m, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules, trainable_params=cfg.lora.trainable_params,
                               gradient_checkpointing=False)
    return model_lib.count_parameters(m)


def accuracy_by_length(result: dict) -> dict[str, float]:
    """{length: mean accuracy over the depths} of a passkey or task result (cells per length and depth)."""
    return {str(L): sum(c["accuracy"] for c in result["cells"] if c["length"] == L) / len(result["depths"])
            for L in result["lengths"]}


def measure(model, tokenizer, tokens: torch.Tensor, args, name: str) -> dict:
    """PPL at every length and passkey accuracy: the same measurement for every arm."""
    t0 = time.perf_counter()
    ppl = [ev.perplexity(model, tokens, L, max_tokens=args.eval_tokens, desc=f"{name} ppl@{L}")
           for L in args.lengths]
    pk = ev.passkey(model, tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_trials, args.seed)
    return {"ppl": ppl, "passkey": {**pk, "accuracy_by_length": accuracy_by_length(pk)},
            "eval_wall_s": round(time.perf_counter() - t0, 1)}


def load_arm(arm: Arm, args, base: Config):
    """(model, tokenizer, facts) of one arm: trained first (or its finished run reused) if the arm trains."""
    out = {"arm": arm.name, "what": arm.what, "trains": arm.trains, "rope_type": arm.rope}
    if arm.trains:
        cfg = arm_config(arm, args, base)
        final, stats = train_arm(cfg, args.force)
        trainable, total = count_trainable(cfg)
        steps = cfg.train.max_steps
        out |= {"factor": getattr(cfg.rope, "factor", None), "trainable_params": trainable, "total_params": total,
                "train": {**stats, "steps": steps, "tokens": steps * tokens_per_step(cfg),
                          "learning_rate": cfg.train.learning_rate, "run": str(final)}}
        model, tokenizer, _ = ev.load_for_eval(str(final), dtype=cfg.model.dtype)
    else:
        path = args.alibi_model if arm.alibi else base.model.name_or_path
        first, *more = arm.methods or (None,)
        model, tokenizer, _ = ev.load_for_eval(path, rope=rope_dict(arm, base), dtype=base.model.dtype, method=first)
        for m in more:  # log-n on top of the first method (it wraps the attention selected before it)
            longctx.apply(model, method=m)
        out |= {"factor": arm.factor, "trainable_params": 0, "total_params": model_lib.count_parameters(model)[1],
                "methods": list(arm.methods)}
    return model, tokenizer, out


# The extras (issue 14 §4): RULER tasks and the per-position loss, kept apart from the PPL/passkey results.

def extras_settings(arm: Arm, args, base: Config) -> dict:
    return {**arm_settings(arm, args, base), "tasks": args.tasks, "task_lengths": args.task_lengths,
            "task_depths": args.task_depths, "task_trials": args.task_trials,
            "position_length": args.position_length, "position_docs": args.position_docs}


def position_documents(base: Config, tokenizer, args) -> list[torch.Tensor]:
    """The first --position-length tokens of up to --position-docs documents of the evaluation data (data.eval, else
    the validation split of data.train, as the perplexity stream)."""
    d = base.data
    source, split = (d.eval, None) if d.eval else (d.train, "validation")
    if isinstance(source, list):  # several weighted training sources: the first one's validation part
        source = source[0].path
    return pl.long_documents(source, tokenizer, args.position_length, split, args.position_docs, d.text_field)


def measure_extras(model, tokenizer, docs: list[torch.Tensor], args) -> dict:
    t0 = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        r = task_lib.evaluate_task(name, model, tokenizer, args.task_lengths, args.task_depths, args.task_trials,
                                   args.seed)
        tasks[name] = {**r, "accuracy_by_length": accuracy_by_length(r)}
    loss = pl.position_loss(model, docs, desc="position loss")
    bucket = max(1, args.position_length // 32)
    return {"tasks": tasks, "position_loss": {"length": args.position_length, "documents": len(docs),
                                              "bucket": bucket, "buckets": pl.buckets(loss, bucket)},
            "extras_wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Report

def machine() -> dict:
    info = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "ram_gib": None, "python": platform.python_version(), "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    try:
        text = Path("/proc/meminfo").read_text()
        info["ram_gib"] = round(int(text.split("MemTotal:")[1].split()[0]) / 2**20, 1)
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = cpuinfo.split("model name")[1].split(":", 1)[1].splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _machine_text(m: dict) -> str:
    return (f"{m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['torch_threads']} torch threads, GPU "
            f"{m['gpu'] or 'none'}; python {m['python']}, torch {m['torch']}, transformers {m['transformers']}")


def _other_machines(res: dict, current: dict) -> list[str]:
    """One line per machine (other than this run's) that measured some of the kept arms: results are resumable
    across sessions, and a session may land on a different CPU or library version."""
    by_text: dict[str, list[str]] = {}
    for name, r in res.items():
        text = _machine_text(r["machine"]) if r.get("machine") else "not recorded"
        if text != _machine_text(current):
            by_text.setdefault(text, []).append(name)
    return [f"Arms {', '.join(names)} were measured on: {text}.  " for text, names in by_text.items()]


def _fmt_params(r: dict) -> str:
    n = r["trainable_params"]
    return "0" if not n else f"{n:,} ({100 * n / r['total_params']:.1f}%)"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rope_label(r: dict) -> str:
    if r.get("methods"):
        return " + ".join(" ".join([m["name"]] + [f"{k}={v}" for k, v in m.items() if k != "name"])
                          for m in r["methods"])
    return "none" if r["rope_type"] == "none" else f"{r['rope_type']} x{r['factor']:g}"


def write_report(res: dict, args, base: Config, stem: Path) -> None:
    """STEM.json, STEM.md (command, machine, table, claims) and STEM.png from the arms measured so far."""
    original, target = original_length(base), base.train.seq_len
    claims = judge(res, original, target)
    mach, when = machine(), datetime.now().isoformat(timespec="seconds")
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": args.command, "date": when, "machine": mach, "original_length": original,
           "target_length": target, "arms": res, "claims": claims}
    (stem.parent / (stem.name + ".json")).write_text(json.dumps(doc, indent=1))

    steps = max(1, math.ceil(args.train_tokens / tokens_per_step(base)))
    other = sorted({r["command"] for r in res.values()} - {args.command})
    lines = [
        "# Quality: does context extension work? (issue 6 §1)", "",
        f"Command: `{args.command}`  ",
        *([f"Arms kept from earlier runs of: {', '.join(f'`{c}`' for c in other)}  "] if other else []),
        f"Date: {when}. Machine: {_machine_text(mach)}.  ",
        *_other_machines(res, mach), "",
        f"Base `{base.model.name_or_path}`, trained at {original} tokens. Fine-tuned arms: `{args.config}` to "
        f"{target} tokens, {steps} steps x {tokens_per_step(base):,} tokens = {steps * tokens_per_step(base):,} "
        f"tokens each (asked: {args.train_tokens:,}), lr {base.train.learning_rate:g} ({base.train.lr_scheduler_type}"
        f", warmup {base.train.warmup_steps}, seed {base.train.seed}); full fine-tuning (f) at lr {args.full_ft_lr:g} "
        "instead (--full-ft-lr): the config's rate is a LoRA rate. Perplexity: the validation split of "
        f"the config's data, {args.eval_tokens:,} scored tokens per length, non-overlapping windows. Passkey: "
        f"depths {', '.join(f'{d:g}' for d in args.passkey_depths)} x {args.passkey_trials} trial(s) per length "
        "(a 2M-parameter code model may retrieve nothing; the numbers are what came out). Train s: wall seconds of "
        "`longctx.trainer.train` (data, model, steps, saving), not a speed benchmark: other jobs may have shared the "
        "machine (scripts/bench_train.py measures speed).", "",
    ]
    lengths, pk_lengths = args.lengths, args.passkey_lengths
    lines += ["| arm | what | rope | trainable params | train tokens | train s | "
              + " | ".join(f"PPL@{L}" for L in lengths) + " | " + " | ".join(f"passkey@{L}" for L in pk_lengths)
              + " |", "|---" * (6 + len(lengths) + len(pk_lengths)) + "|"]
    for name, r in res.items():
        t = r.get("train")
        cells = [name, r["what"], _rope_label(r), _fmt_params(r), f"{t['tokens']:,}" if t else "0",
                 f"{t['wall_s']}" if t and t.get("wall_s") is not None else "-"]
        cells += [_num(ppl_at(res, name, L)) for L in lengths]
        cells += [_num(r["passkey"]["accuracy_by_length"].get(str(L))) for L in pk_lengths]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![PPL vs length]({stem.name}.png)", "", "## Claims", "",
              "Judged from the table by the thresholds in `scripts/bench_quality.py` (COLLAPSE, DEGRADE, ...): each "
              "check supports or contradicts the claim or falls between the thresholds; all support = CONFIRMED, "
              "all contradict = REFUTED, otherwise MIXED.", ""]
    for i, c in enumerate(claims, 1):
        lines.append(f"{i}. **{c['claim']}: {c['verdict']}**" + ("" if c["checks"] else f" (needs arms {c['needs']})"))
        lines += [f"   - {text}: {'supports' if ok else 'contradicts' if ok is False else 'in between'}"
                  for text, ok in zip(c["checks"], c["outcomes"])]
    lines += extras_report(res, original, stem)
    (stem.parent / (stem.name + ".md")).write_text("\n".join(lines) + "\n")
    plot(res, original, target, stem.parent / (stem.name + ".png"))


def _mean_loss(buckets: list[dict], lo: int, hi: int) -> float | None:
    """Mean loss of the buckets that start in [lo, hi)."""
    vals = [b["loss"] for b in buckets if lo <= b["start"] < hi]
    return sum(vals) / len(vals) if vals else None


def extras_report(res: dict, original: int, stem: Path) -> list[str]:
    """The tasks table and the per-position loss plot (STEM-position.png) of the arms that have extras."""
    ext = {name: r["extras"] for name, r in res.items() if "extras" in r}
    if not ext:
        return []
    first = next(iter(ext.values()))
    s, pos = first["settings"], first["position_loss"]
    length = pos["length"]
    cols = [(t, L) for t in s["tasks"] for L in s["task_lengths"]]
    lines = ["", "## Long-context tasks and per-position loss (issue 14 §4)", "",
             f"RULER tasks (longctx/tasks.py), generated locally: depth {', '.join(f'{d:g}' for d in s['task_depths'])}"
             f" x {s['task_trials']} prompt(s) per length, accuracy = mean score (multivalue: the share of values "
             f"found). Per-position loss: mean next-token loss (nats) over {pos['documents']} validation documents of "
             f"{length} tokens, each alone, dense causal attention; 'loss < {original}' averages positions 1-"
             f"{original - 1} (inside the base's window), 'loss last {original}' the last {original} positions. A "
             "model that uses far tokens keeps its loss down at the end.", "",
             "| arm | " + " | ".join(f"{t}@{L}" for t, L in cols) + f" | loss < {original} | loss last {original} |",
             "|---" * (3 + len(cols)) + "|"]
    for name, x in ext.items():
        b = x["position_loss"]["buckets"]
        cells = [_num(x["tasks"][t]["accuracy_by_length"].get(str(L))) for t, L in cols]
        cells += [_num(_mean_loss(b, 1, original)), _num(_mean_loss(b, length - original, length))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    plot_position(ext, res, original, stem.parent / f"{stem.name}-position.png")
    return lines + ["", f"![loss by position]({stem.name}-position.png)"]


def plot_position(ext: dict, res: dict, original: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, x) in enumerate(ext.items()):
        b = x["position_loss"]["buckets"]
        ax.plot([(k["start"] + k["end"] - 1) / 2 for k in b], [k["loss"] for k in b], color=colors[i % len(colors)],
                linestyle="-" if res[name]["trains"] else "--", label=f"{name} ({_rope_label(res[name])})")
    ax.axvline(original, color="gray", linewidth=1)
    ax.set_xlabel(f"token position (the base was trained at {original}: gray line)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title("tiny-base: loss by position, training-free (dashed) vs fine-tuned (solid)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(res: dict, original: int, target: int, path: Path) -> None:
    """PPL vs length, log y: training-free arms dashed, fine-tuned solid, the original length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, r) in enumerate(res.items()):
        rows = sorted(r["ppl"], key=lambda x: x["length"])
        ax.plot([x["length"] for x in rows], [x["ppl"] for x in rows], marker="o", color=colors[i % len(colors)],
                linestyle="-" if r["trains"] else "--", label=f"{name} ({_rope_label(r)})")
    ax.axvline(original, color="gray", linewidth=1)
    ax.axvline(target, color="gray", linewidth=1, linestyle=":")
    lengths = sorted({x["length"] for r in res.values() for x in r["ppl"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(f"context length (tokens); trained at {original} (solid line), fine-tuned to {target} (dotted)")
    ax.set_ylabel("perplexity")
    ax.set_title("tiny-base: training-free (dashed) vs fine-tuned (solid)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", type=select_arms, default=list(ARMS), help="comma-separated names or group letters "
                    f"(default all: {','.join(ARM_BY_NAME)})")
    ap.add_argument("--config", default="configs/quickstart.yaml", help="base of every fine-tuning arm")
    ap.add_argument("--alibi-model", default=None, help="an ALiBi base (BLOOM or MPT directory) for the h arms; "
                    "without it they are skipped")
    ap.add_argument("--train-tokens", type=int, default=491520,
                    help="training tokens per fine-tuned arm; steps = ceil(this / tokens per step) (default 60 steps "
                         "x 8 x 1024)")
    ap.add_argument("--full-ft-lr", type=float, default=5e-5, help="learning rate of the full fine-tuning arm (f)")
    ap.add_argument("--lengths", type=ev.lengths_arg, default=[256, 512, 1024, 2048], help="perplexity lengths")
    ap.add_argument("--eval-tokens", type=int, default=60000, help="scored tokens per length")
    ap.add_argument("--passkey-lengths", type=ev.lengths_arg, default=None, help="default: --lengths")
    ap.add_argument("--passkey-depths", type=ev.depths_arg, default=[0.0, 0.5, 1.0])
    ap.add_argument("--passkey-trials", type=int, default=3, help="keys per (length, depth)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the passkey keys and the task prompts")
    ap.add_argument("--tasks", type=lambda t: [x for x in t.split(",") if x], default=["multikey", "multivalue",
                    "vartrack"], help=f"RULER tasks of the extras, of: {', '.join(n for n in task_lib.TASKS if n != 'passkey')}")
    ap.add_argument("--task-lengths", type=ev.lengths_arg, default=[256, 1024])
    ap.add_argument("--task-depths", type=ev.depths_arg, default=[0.5])
    ap.add_argument("--task-trials", type=int, default=4, help="prompts per (task, length, depth)")
    ap.add_argument("--position-length", type=int, default=1024, help="tokens per document of the per-position loss")
    ap.add_argument("--position-docs", type=int, default=8, help="documents of the per-position loss (at most)")
    ap.add_argument("--no-extras", dest="extras", action="store_false", help="PPL and passkey only")
    ap.add_argument("--out", default="benchmarks/quality", help="arm results in OUT/ARM.json; report OUT.json|md|png")
    ap.add_argument("--runs", default="runs/bench_quality", help="training runs (scratch, not committed)")
    ap.add_argument("--force", action="store_true", help="redo arms already measured (a run is retrained only if "
                    "its config changed; delete RUNS/ARM to retrain it anyway)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    args.passkey_lengths = args.passkey_lengths or args.lengths
    unknown = [t for t in args.tasks if t not in task_lib.TASKS or t == "passkey"]
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(unknown)}; allowed: "
                 f"{', '.join(n for n in task_lib.TASKS if n != 'passkey')}")
    args.command = "python " + shlex.join(["scripts/bench_quality.py", *(sys.argv[1:] if argv is None else argv)])
    return args

def collect(args, base: Config) -> dict:
    """Every stored arm (in ARMS order) measured with the current settings, selected now or earlier."""
    res = {}
    for arm in ARMS:
        path = Path(args.out) / f"{arm.name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            if r.get("settings") == arm_settings(arm, args, base):
                res[arm.name] = r
                x = Path(args.out) / "extras" / f"{arm.name}.json"
                if x.is_file() and json.loads(x.read_text()).get("settings") == extras_settings(arm, args, base):
                    r["extras"] = json.loads(x.read_text())
    return res


def store(path: Path, result: dict) -> None:
    """Write one arm's result atomically (a killed run leaves the old file or none, never half of one)."""
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[bench_quality] %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        base = load_config(args.config)
        out = Path(args.out)
        tokens: dict[str, torch.Tensor] = {}  # the evaluation stream per tokenizer (the base's, the ALiBi base's)
        docs: dict[str, list[torch.Tensor]] = {}  # the per-position loss documents per tokenizer
        for arm in (bar := tqdm(args.arms, desc="arms", unit="arm")):
            bar.set_postfix_str(arm.name)
            if arm.alibi and not args.alibi_model:
                log.info("%s: skipped (needs --alibi-model)", arm.name)
                continue
            path, settings = out / f"{arm.name}.json", arm_settings(arm, args, base)
            xpath, xsettings = out / "extras" / f"{arm.name}.json", extras_settings(arm, args, base)
            need_main = not is_finished(path, settings, args.force)
            need_extras = args.extras and not is_finished(xpath, xsettings, args.force)
            if not (need_main or need_extras):
                log.info("%s: done before, skipped (%s)", arm.name, path)
                continue
            model_path = args.alibi_model if arm.alibi else base.model.name_or_path
            model, tokenizer, facts = load_arm(arm, args, base)
            stamp = {"command": args.command, "machine": machine()}  # store() adds the time it finished
            if need_main:
                if model_path not in tokens:  # once per tokenizer
                    eval_cfg = load_config(args.config, overrides=[f"eval.lengths={args.lengths}"])
                    tokens[model_path] = ev.run_eval_tokens(eval_cfg, tokenizer)
                result = facts | measure(model, tokenizer, tokens[model_path], args, arm.name)
                store(path, result | {"settings": settings} | stamp)
            if need_extras:
                if model_path not in docs:
                    docs[model_path] = position_documents(base, tokenizer, args)
                store(xpath, {"arm": arm.name, **measure_extras(model, tokenizer, docs[model_path], args),
                              "settings": xsettings} | stamp)
            del model
            write_report(collect(args, base), args, base, out)
        write_report(collect(args, base), args, base, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.parent.joinpath(out.name + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
