"""Sweeps: a grid of overrides on one base config, launched through submitit, collected into a leaderboard.

    longctx sweep configs/sweeps/quickstart-factors.yaml [--dry-run] [--executor local|slurm|debug] [--collect]

A sweep file (YAML, strict like the config: unknown keys are errors):

    base: configs/quickstart.yaml        # the config every run starts from (paths are relative to the cwd)
    output_dir: runs/sweeps/factors      # OUTPUT: one directory per run, logs/, leaderboard.{csv,md,png}
    executor: local                      # local | slurm | debug
    mode: train                          # train (train, then evaluate) | eval (training-free: evaluate the base)
    overrides: {train.max_steps: 60}     # dotted keys applied to every run
    grid: {rope.rope_type: [linear, yarn], rope.factor: [2, 4]}     # the cartesian product
    runs: [{rope.rope_type: ntk, rope.alpha: 4}]                    # explicit runs (x the grid when both are given)
    max_parallel: 2                      # local: jobs at once
    slurm: {partition: gpu, nodes: 1, gpus_per_node: 8, time_min: 1440, array_parallelism: 8}

Each run is its own process, `python train.py BASE train.resume=auto k=v ... train.output_dir=OUTPUT/<name>`
(`torchrun` over the job's nodes and GPUs on SLURM), so runs are isolated from each other and from the launcher,
and every launch of a run is a resume: a rerun skips finished runs and continues interrupted ones. On SLURM the
runs are one job array; SIGUSR1 before the time limit is forwarded to the trainer (which saves a checkpoint and
exits 0) and submitit requeues the job, which resumes.

The package, one idea a file: `spec` (the sweep file and its runs), `names` (run names), `state` (what a run
directory says: finished, resumable, running), `job` (one run as a process, what submitit pickles), `executors`
(submitit local/SLURM/debug, launch), `leaderboard` (collect, write) and `cli` (`longctx sweep`).
"""

# Every name that was importable from the single-file longctx/sweep.py still is (scripts/, tests/, and submitit
# pickles of `Job` written before the split, which name it longctx.sweep.Job).
from longctx.sweep.cli import add_parsers, cmd_sweep
from longctx.sweep.executors import active_slurm_jobs, launch, log, make_executor
from longctx.sweep.job import CLI, PREEMPT_SIGNAL, TRAIN_SCRIPT, Job, eval_args, make_job
from longctx.sweep.leaderboard import collect, passkey_accuracy, train_stats, write_leaderboard
from longctx.sweep.names import run_name
from longctx.sweep.spec import Run, SlurmSettings, Sweep, SweepFile, expand, load_sweep
from longctx.sweep.state import COMPLETE, RUNNING, is_finished, last_checkpoint, run_state, running_here

__all__ = [
    "CLI", "COMPLETE", "PREEMPT_SIGNAL", "RUNNING", "TRAIN_SCRIPT", "Job", "Run", "SlurmSettings", "Sweep",
    "SweepFile", "active_slurm_jobs", "add_parsers", "cmd_sweep", "collect", "eval_args", "expand", "is_finished",
    "last_checkpoint", "launch", "load_sweep", "log", "make_executor", "make_job", "passkey_accuracy", "run_name",
    "run_state", "running_here", "train_stats", "write_leaderboard",
]
