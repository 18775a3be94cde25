"""The leaderboard: one row per run from what is on disk (PPL per length, passkey, train loss, tokens/s), written as
csv, markdown and a PPL-vs-length plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from longctx import rundir
from longctx.sweep.spec import Sweep
from longctx.sweep.state import last_checkpoint, run_state


def _ppl_rows(ppl: dict) -> list[dict]:
    """The run's own perplexity rows from RUN/eval/ppl.json: 'extended' after training, the only model in eval."""
    if "extended" in ppl:
        return ppl["extended"]
    if len(ppl) == 1:
        return next(iter(ppl.values()))
    others = [v for k, v in ppl.items() if k != "base"]
    return others[0] if others else []


def passkey_accuracy(obj: Any) -> float | None:
    """Accuracy from RUN/eval/passkey.json, whatever its exact layout: a number, {accuracy: ...}, {extended: ...},
    or a list/dict of per-length results (averaged)."""
    if isinstance(obj, bool):
        return None
    if isinstance(obj, (int, float)):
        return float(obj)
    if isinstance(obj, dict):
        for key in ("accuracy", "extended", "results", "overall"):
            if key in obj:
                return passkey_accuracy(obj[key])
        values = [passkey_accuracy(v) for k, v in obj.items() if k != "base"]
    elif isinstance(obj, list):
        values = [passkey_accuracy(v) for v in obj]
    else:
        return None
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def train_stats(run_dir: Path) -> dict[str, float | None]:
    """Last logged loss and tokens/s, and the step count, from the newest checkpoint's trainer_state.json."""
    ckpt = last_checkpoint(run_dir)
    out: dict[str, float | None] = {"train_loss": None, "tokens_per_s": None, "steps": None}
    state = rundir.read_json(ckpt / "trainer_state.json") if ckpt else None
    for entry in (state or {}).get("log_history", []):
        if "loss" in entry:
            out["train_loss"] = entry["loss"]
        if "tokens_per_s" in entry:
            out["tokens_per_s"] = entry["tokens_per_s"]
    out["steps"] = (state or {}).get("global_step")
    return out


def collect(sweep: Sweep, status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per run: its overrides, status, PPL per length, passkey accuracy, train loss, tokens/s. `status`
    (failed, submitted, queued/running) is shown for runs that are not finished on disk."""
    keys = list(dict.fromkeys(k for r in sweep.runs for k in r.own))
    rows = []
    for run in sweep.runs:
        ppl = rundir.read_json(rundir.eval_dir(run.dir) / "ppl.json") or {}
        passkey = rundir.read_json(rundir.eval_dir(run.dir) / "passkey.json")
        state = run_state(run, sweep.file.mode)
        if state != "done" and (status or {}).get(run.name):
            state = status[run.name]
        row = {"run": run.name, **{k: run.own.get(k) for k in keys}, "status": state}
        row.update({f"ppl@{r['length']}": r["ppl"] for r in sorted(_ppl_rows(ppl), key=lambda r: r["length"])})
        row["passkey"] = passkey_accuracy(passkey) if passkey is not None else None
        by_length = passkey.get("accuracy_by_length") if isinstance(passkey, dict) else None
        if isinstance(by_length, dict):
            row.update({f"passkey@{L}": passkey_accuracy(v) for L, v in by_length.items()})
        if sweep.file.mode == "train":
            stats = train_stats(run.dir)
            row.update(train_loss=stats["train_loss"], tokens_per_s=stats["tokens_per_s"])
        row["_ppl"], row["_base"] = _ppl_rows(ppl), ppl.get("base") if "extended" in ppl else None
        rows.append(row)
    return rows


def write_leaderboard(sweep: Sweep, rows: list[dict[str, Any]]) -> Path:
    """OUTPUT/leaderboard.csv, .md (sorted by PPL at the longest length) and .png (PPL vs length)."""
    out = sweep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["length"] for row in rows for r in row["_ppl"]})
    passkey_lengths = sorted({int(c.split("@")[1]) for row in rows for c in row if c.startswith("passkey@")
                              and c.split("@")[1].isdigit()})
    fixed = [c for c in rows[0] if not c.startswith(("_", "ppl@", "passkey@"))] if rows else ["run"]
    tail = [c for c in ("passkey", "train_loss", "tokens_per_s") if c in fixed]
    columns = [c for c in fixed if c not in tail] + [f"ppl@{L}" for L in lengths] + tail[:1] + \
        [f"passkey@{L}" for L in passkey_lengths] + tail[1:]
    key = f"ppl@{lengths[-1]}" if lengths else None
    rows = sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) or 0.0)) if key else rows
    with open(out / "leaderboard.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows([{c: _cell(r.get(c), csv_=True) for c in columns} for r in rows])
    lines = [f"# {sweep.name}: {len(rows)} runs ({sweep.file.mode}, base {sweep.file.base})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    base = next((r["_base"] for r in rows if r["_base"]), None)
    if base:
        lines += ["", "base model (no scaling): " + ", ".join(f"PPL@{r['length']} {r['ppl']:.3f}"
                                                          for r in sorted(base, key=lambda r: r["length"]))]
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    curves = {r["run"]: r["_ppl"] for r in rows if r["_ppl"]}
    if base:
        curves["base (no scaling)"] = base
    if curves:
        from longctx.evaluate import plot_ppl

        plot_ppl(curves, out / "leaderboard.png")
    return out / "leaderboard.md"


def _cell(v: Any, csv_: bool = False) -> str:
    if v is None:
        return "" if csv_ else "-"
    if isinstance(v, float):
        return repr(v) if csv_ else (f"{v:.1f}" if abs(v) >= 1000 else f"{v:.3f}" if math.isfinite(v) else str(v))
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)
