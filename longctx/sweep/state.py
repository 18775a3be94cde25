"""What a run directory says about a run: its newest complete checkpoint, whether it is finished, and whether a
process is running it now (the trainer's claim on the directory, or the RUNNING marker a job of this machine writes
before its trainer starts)."""

from __future__ import annotations

from pathlib import Path

from longctx import rundir
from longctx.rundir import COMPLETE  # noqa: F401  (re-exported by longctx.sweep)
from longctx.sweep.spec import Run

RUNNING = rundir.SWEEP_RUNNING  # in a run directory while a job of this machine runs it: {host, pids}


def last_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint-<step> (the one train.resume=auto picks)."""
    done = rundir.complete_checkpoints(run_dir)
    return done[-1] if done else None


def is_finished(run: Run, mode: str) -> bool:
    has_eval = (rundir.eval_dir(run.dir) / "ppl.json").is_file()
    if mode == "eval":
        return has_eval
    return rundir.info_path(rundir.final_dir(run.dir)).is_file() and (has_eval or not run.config.eval.lengths)


def run_state(run: Run, mode: str) -> str:
    if is_finished(run, mode):
        return "done"
    ckpt = last_checkpoint(run.dir) if mode == "train" else None
    return f"resume from {ckpt.name}" if ckpt else "new"


def hostname() -> str:
    import socket

    return socket.gethostname()


def pid_stamps(pids: list[int]) -> dict[str, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[str(pid)] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass
    return out


def running_here(run_dir: Path) -> str | None:
    """Who is running this run now: the live trainer that holds the run directory's claim (on any host that shares
    the directory, started by a sweep or by hand; the trainer refuses a second one), or a job on this machine whose
    trainer has not claimed it yet; None when nobody is."""
    import psutil

    claimed = rundir.holder(run_dir)
    if claimed:
        return claimed
    info = rundir.read_json(run_dir / RUNNING)
    if not isinstance(info, dict) or info.get("host") != hostname():
        return None
    for pid, created in (info.get("pids") or {}).items():
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - created) < 1 and p.status() != psutil.STATUS_ZOMBIE:
                return f"process {pid}"
        except (psutil.Error, ValueError):
            continue
    return None
