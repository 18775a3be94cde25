"""`longctx sweep`: print the runs and their state, launch what is not finished, write the leaderboard."""

from __future__ import annotations

import argparse
import sys

from longctx.config import ConfigError
from longctx.sweep.executors import active_slurm_jobs, launch
from longctx.sweep.leaderboard import collect, write_leaderboard
from longctx.sweep.names import show_value
from longctx.sweep.spec import load_sweep
from longctx.sweep.state import run_state, running_here


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, executor=args.executor)
    sf = sweep.file
    if args.max_parallel is not None:
        if args.max_parallel < 1:
            raise ConfigError(f"--max-parallel: must be >= 1, got {args.max_parallel}")
        sf.max_parallel = args.max_parallel
    # runs a job is still working on: queued/running on SLURM, or a live process of this machine
    active = active_slurm_jobs(sweep) if sf.executor == "slurm" else {}
    active.update({r.name: where for r in sweep.runs if (where := running_here(r.dir))})
    states = {r.name: f"running ({active[r.name]})" if r.name in active else run_state(r, sf.mode)
              for r in sweep.runs}
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s), mode {sf.mode}, executor {sf.executor} -> {sweep.output_dir}")
    width = max(len(r.name) for r in sweep.runs)
    for r in sweep.runs:
        own = " ".join(f"{k}={show_value(v)}" for k, v in r.own.items())
        print(f"  {states[r.name]:<24} {r.name:<{width}}  {own}")
    if args.dry_run:
        return 0
    results: dict[str, str] = {}
    if not args.collect:
        todo = [r for r in sweep.runs if states[r.name] != "done" and r.name not in active]
        for name, where in active.items():
            print(f"  {name}: still queued or running as {where}; not started again")
        skipped = len(sweep.runs) - len(todo)
        if skipped:
            print(f"skipping {skipped} finished or active run(s)")
        results = launch(sweep, todo)
    board = write_leaderboard(sweep, collect(sweep, {**{n: "queued/running" for n in active}, **results}))
    print(board.read_text())
    failed = [n for n, e in results.items() if e == "failed"]
    if sf.executor == "slurm" and results:
        print(f"submitted {len(results)} run(s); logs in {sweep.logs}; `longctx sweep {args.sweep} --collect` "
              "writes the leaderboard when they are done")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; logs in {sweep.logs}; rerun the sweep to "
              "retry them (finished runs are skipped)", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of configs (local, SLURM via submitit) and write a leaderboard")
    p.add_argument("sweep", help="sweep file, e.g. configs/sweeps/quickstart-factors.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state; launch nothing")
    p.add_argument("--executor", choices=["local", "slurm", "debug"], help="override the file's executor")
    p.add_argument("--max-parallel", type=int, help="override max_parallel (local)")
    p.add_argument("--collect", action="store_true", help="only write the leaderboard from what is on disk")
    p.set_defaults(func=cmd_sweep)
