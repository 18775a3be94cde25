"""Sweeps: expansion and validation, a 2x2 sweep end to end on submitit's local executor with its leaderboard,
skip on rerun, resume of an interrupted run, preemption -> requeue -> resume through submitit's own machinery,
an eval-only sweep on the debug executor, and the SLURM job array script that submitit writes."""

import csv
import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from longctx import sweep as sweep_lib
from longctx.cli import main
from longctx.sweep.job import log_tail
from longctx.sweep.names import run_names
from longctx.sweep.state import hostname, pid_stamps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(train_config, tmp_path_factory):
    """A micro training config: 3 steps of 128 tokens, checkpoints at 2 and 3, PPL at 64 and 128."""
    cfg = train_config("unused", train={"save_steps": 2}, eval={"lengths": [64, 128], "max_tokens": 200})
    path = tmp_path_factory.mktemp("base") / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def sweep_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["sweep", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------------------------
# Files, names, errors (no training)

@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # their paths are relative to the repository root
    sweep = sweep_lib.load_sweep(path)
    assert len(sweep.runs) >= 4 and len({r.name for r in sweep.runs}) == len(sweep.runs)
    rc, out, _ = sweep_cli(capsys, path, "--dry-run")
    assert rc == 0 and all(r.name in out for r in sweep.runs)


def test_run_names_are_derived_from_overrides_and_unique():
    assert sweep_lib.run_name({"rope.rope_type": "yarn", "rope.factor": 4}) == "rope_type-yarn__factor-4"
    assert sweep_lib.run_name({"rope.factor": 4.0, "data.train": "a/b c"}) == "factor-4__train-a_b_c"
    assert sweep_lib.run_name({}) == "base"
    names = run_names([{"rope.alpha": 2}, {"lora.alpha": 2}, {"rope.alpha": 3}])
    assert names == ["rope.alpha-2", "lora.alpha-2", "alpha-3"]


def test_dry_run_expands_grid_x_runs_and_launches_nothing(base, tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"),
                       overrides={"train.max_steps": 2}, grid={"rope.rope_type": ["linear", "yarn"]},
                       runs=[{"rope.factor": 2}, {"rope.factor": 4}])
    rc, out, _ = sweep_cli(capsys, path, "--dry-run")
    assert rc == 0
    for name in ("rope_type-linear__factor-2", "rope_type-yarn__factor-2", "rope_type-linear__factor-4",
                 "rope_type-yarn__factor-4"):
        assert name in out
    assert "rope.rope_type=yarn rope.factor=4" in out and not (tmp_path / "out").exists()
    run = sweep_lib.load_sweep(path).runs[-1]
    assert run.config.train.output_dir == str(tmp_path / "out" / run.name) and run.config.train.max_steps == 2
    assert run.config.rope.factor == 4.0 and run.config.train.resume == "auto"


@pytest.mark.parametrize("fields,message", [
    ({"gird": {"rope.factor": [2]}}, "gird: unknown key (did you mean grid?)"),
    ({"grid": {"rope.factor": []}}, "grid.rope.factor: empty list; give at least one value"),
    ({"grid": {"rope.factr": [2, 4]}}, "rope.factr: unknown key (did you mean rope.factor?)"),
    ({"grid": {"rope.factor": [2, 0.5]}}, "(run factor-0.5)"),
    ({"slurm": {"gpus": 8}}, "slurm.gpus: unknown key (did you mean slurm.gpus_per_node?)"),
    ({"executor": "k8s"}, "executor: Input should be 'local', 'slurm' or 'debug'"),
    ({"overrides": {"train.output_dir": "x"}}, "overrides.train.output_dir: set by the sweep"),
    # issue 18 item 7: a whole-section override cannot move a run out of the sweep's directory either
    ({"grid": {"train": [{"output_dir": "/tmp/elsewhere", "seq_len": 128}]}},
     "grid.train: sets train.output_dir, which is set by the sweep"),
    ({"runs": [{"train": {"output_dir": "../x"}}]}, "runs[0].train: sets train.output_dir"),
    ({"overrides": {"train": {"seq_len": 128, "output_dir": "x"}}}, "overrides.train: sets train.output_dir"),
    # issue 18 item 10: numbers checked in sweeps as in configs
    ({"grid": {"rope.factor": [2, float("nan")]}}, "rope.factor: Input should be a finite number"),
    ({"grid": {"train.warmup_steps": [-1]}}, "train.warmup_steps: must be >= 0, got -1"),
    ({"slurm": {"mem_gb": float("nan")}}, "slurm.mem_gb: Input should be a finite number"),
    ({"slurm": {"mem_gb": -4}}, "slurm.mem_gb: must be > 0, got -4"),
    ({"base": "nope.yaml"}, "base: config file not found: nope.yaml"),
])
def test_bad_sweep_files_exit_2(base, tmp_path, capsys, fields, message):
    fields = {"base": str(base), "output_dir": str(tmp_path / "out"), **fields}
    rc, _, err = sweep_cli(capsys, write_sweep(tmp_path / "bad.yaml", **fields))
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_whole_train_section_in_the_grid_keeps_runs_in_the_sweep_directory(base, tmp_path):
    train = {k: v for k, v in yaml.safe_load(Path(base).read_text())["train"].items() if k != "output_dir"}
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"),
                       grid={"train": [{**train, "max_steps": 3}, {**train, "max_steps": 4}]})
    runs = sweep_lib.load_sweep(path).runs
    assert [r.config.train.max_steps for r in runs] == [3, 4]
    assert [r.config.train.output_dir for r in runs] == [str(tmp_path / "out" / r.name) for r in runs]


# ---------------------------------------------------------------------------------------------------------------
# A 2x2 sweep on the local executor, rerun, resume

@pytest.fixture(scope="module")
def done_sweep(base, tmp_path_factory):
    """rope.rope_type in {linear, yarn} x rope.factor in {2, 4}, two jobs at once, run through the CLI."""
    d = tmp_path_factory.mktemp("sweep")
    path = write_sweep(d / "factors.yaml", base=str(base), output_dir=str(d / "out"), executor="local",
                       max_parallel=2, grid={"rope.rope_type": ["linear", "yarn"], "rope.factor": [2, 4]})
    t0 = time.time()
    rc = main(["sweep", str(path)])
    assert rc == 0, [log_tail(p, 30) for p in (d / "out" / "logs").glob("*.log")]
    return path, d / "out", time.time() - t0


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a local sweep of train.py subprocesses: the end-to-end layer
def test_local_sweep_end_to_end_gives_a_4_row_leaderboard(done_sweep):
    _, out, _ = done_sweep
    rows = read_csv(out / "leaderboard.csv")
    names = {"rope_type-linear__factor-2", "rope_type-linear__factor-4", "rope_type-yarn__factor-2",
             "rope_type-yarn__factor-4"}
    assert {r["run"] for r in rows} == names
    for r in rows:
        assert r["status"] == "done" and r["rope.rope_type"] in ("linear", "yarn") and r["rope.factor"] in ("2", "4")
        assert float(r["ppl@64"]) > 1 and float(r["ppl@128"]) > 1 and float(r["train_loss"]) > 0
        assert float(r["tokens_per_s"]) > 0 and r["passkey"] == ""
        run = out / r["run"]
        assert (run / "final" / "longctx.json").is_file() and (run / "eval" / "ppl.json").is_file()
        assert json.loads((run / "final" / "longctx.json").read_text())["rope"]["factor"] == float(r["rope.factor"])
        assert "starting" in (out / "logs" / f"{r['run']}.log").read_text()
    ppl128 = [float(r["ppl@128"]) for r in rows]
    assert ppl128 == sorted(ppl128)  # ranked by PPL at the longest length
    md = (out / "leaderboard.md").read_text()
    assert md.count("| rope_type-") == 4 and "ppl@128" in md and "base model (no scaling)" in md
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a local sweep of train.py subprocesses: the end-to-end layer
def test_rerun_skips_finished_runs_in_seconds(done_sweep, capsys):
    path, out, first = done_sweep
    logs = {p: p.read_text() for p in (out / "logs").glob("*.log")}
    t0 = time.time()
    rc, stdout, _ = sweep_cli(capsys, path)
    elapsed = time.time() - t0
    assert rc == 0 and "skipping 4 finished or active run(s)" in stdout and stdout.count("done") >= 4
    assert elapsed < 15 and elapsed < first / 4, (elapsed, first)
    assert {p: p.read_text() for p in (out / "logs").glob("*.log")} == logs  # nothing was started
    assert len(read_csv(out / "leaderboard.csv")) == 4


@pytest.mark.slow  # a local sweep of train.py subprocesses: the end-to-end layer
def test_interrupted_run_resumes_on_rerun(done_sweep, capsys):
    """The state a kill leaves: complete checkpoint-2, checkpoint-3 half-written (no completion marker), no final.
    The rerun resumes from checkpoint-2 and ends with the weights of the uninterrupted run."""
    path, out, _ = done_sweep
    run = out / "rope_type-yarn__factor-4"
    reference = load_file(str(run / "final" / "adapter_model.safetensors"))
    (run / "checkpoint-3" / sweep_lib.COMPLETE).unlink()
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "eval")
    rc, stdout, _ = sweep_cli(capsys, path, "--dry-run")
    assert rc == 0 and "resume from checkpoint-2" in stdout
    rc, stdout, _ = sweep_cli(capsys, path)
    assert rc == 0 and "skipping 3 finished or active run(s)" in stdout
    log = (out / "logs" / "rope_type-yarn__factor-4.log").read_text()
    assert "rope_type-yarn__factor-4: resuming from checkpoint-2" in log
    assert "ignoring incomplete checkpoint(s) checkpoint-3" in log
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    resumed = load_file(str(run / "final" / "adapter_model.safetensors"))
    for k in reference:
        assert (resumed[k] - reference[k]).abs().max() <= 1e-5, k
    assert (run / "eval" / "ppl.json").is_file() and len(read_csv(out / "leaderboard.csv")) == 4


@pytest.mark.slow  # a local sweep of train.py subprocesses: the end-to-end layer
def test_leaderboard_reads_passkey_results(done_sweep, capsys):
    from longctx.evaluate import write_passkey

    path, out, _ = done_sweep
    cells = [{"length": L, "depth": d, "accuracy": a} for L, d, a in [(64, 0.0, 1.0), (64, 1.0, 0.5),
                                                                        (128, 0.0, 0.5), (128, 1.0, 0.0)]]
    write_passkey({"lengths": [64, 128], "depths": [0.0, 1.0], "trials": 2, "seed": 0, "cells": cells},
                  out / "rope_type-linear__factor-2" / "eval")
    rc, stdout, _ = sweep_cli(capsys, path, "--collect")
    assert rc == 0 and "skipping" not in stdout
    rows = {r["run"]: r for r in read_csv(out / "leaderboard.csv")}
    row = rows["rope_type-linear__factor-2"]
    assert float(row["passkey"]) == 0.5 and float(row["passkey@64"]) == 0.75 and float(row["passkey@128"]) == 0.25
    assert rows["rope_type-yarn__factor-2"]["passkey"] == ""
    assert sweep_lib.passkey_accuracy({"accuracy": 0.9}) == 0.9
    assert sweep_lib.passkey_accuracy({"extended": [{"length": 64, "accuracy": 1.0}, {"accuracy": 0.0}]}) == 0.5
    assert sweep_lib.passkey_accuracy({"foo": "bar"}) is None


# ---------------------------------------------------------------------------------------------------------------
# Preemption through submitit's machinery, the debug executor, the SLURM script

@pytest.mark.slow  # torchrun, two trainer starts: about a minute on 2 CPU cores
def test_preemption_checkpoints_requeues_and_resumes(base, tmp_path):
    """The SLURM job function (torchrun, 1 node x 1 process) on submitit's LocalExecutor: SIGUSR1 to the job ->
    `Job.checkpoint` stops the trainer cleanly -> submitit requeues the job -> it resumes and finishes."""
    # Enough steps after checkpoint-2 that the signal always lands mid-run: with 8, a fast machine finished the
    # micro run before the job had seen SIGUSR1 (the test then saw no preemption at all).
    steps = 40
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), executor="local",
                       overrides={"train.max_steps": steps, "eval.lengths": []}, grid={"rope.factor": [2]},
                       slurm={"nodes": 1, "gpus_per_node": 1})
    sweep = sweep_lib.load_sweep(path)
    (run,) = sweep.runs
    job = sweep_lib.make_job(sweep, run, torchrun=True)
    assert "torch.distributed.run" in job.argv()
    sweep.logs.mkdir(parents=True)
    sj = sweep_lib.make_executor(sweep).submit(job)
    deadline = time.time() + 300
    while not (run.dir / "checkpoint-2" / sweep_lib.COMPLETE).is_file():
        assert not sj.done() and time.time() < deadline, log_tail(job.log, 40)
        time.sleep(0.2)
    tasks = [p for p in psutil.Process(sj._process.pid).children(recursive=True) if "submitit.core._submit" in cmdline(p)]
    assert len(tasks) == 1
    os.kill(tasks[0].pid, signal.SIGUSR1)  # what SLURM sends signal_delay_s before the time limit
    assert sj.result() == str(run.dir), log_tail(job.log, 40)
    log = job.log.read_text()
    assert "preemption signal" in log and "saving a checkpoint at the end of this step" in log
    resumed_from = int(log.split(": resuming from checkpoint-")[1].split()[0])
    assert 2 <= resumed_from < steps and (run.dir / "final" / "longctx.json").is_file()
    assert json.loads((run.dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())["global_step"] == steps


@pytest.mark.slow  # evaluates two runs through the CLI: the end-to-end layer
def test_eval_only_sweep_on_the_debug_executor(micro, corpus, base, tmp_path, capsys):
    """mode: eval evaluates the base model with the run's rope (`longctx eval ppl --rope ...`), trains nothing."""
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), mode="eval",
                       executor="local", overrides={"data.eval": str(corpus)},
                       grid={"rope.rope_type": ["yarn"], "rope.factor": [4]})
    rc, out, err = sweep_cli(capsys, path, "--executor", "debug")
    assert rc == 0, err
    (row,) = read_csv(tmp_path / "out" / "leaderboard.csv")
    assert row["run"] == "rope_type-yarn__factor-4" and float(row["ppl@128"]) > 1 and "train_loss" not in row
    run = tmp_path / "out" / row["run"]
    assert list(json.loads((run / "eval" / "ppl.json").read_text())) == ["base yarn x4.0"]
    assert "--rope rope_type=yarn factor=4.0" in (tmp_path / "out" / "logs" / f"{row['run']}.log").read_text()
    assert not (run / "final").exists()  # nothing was trained


def test_failed_run_is_reported(base, tmp_path):
    """A job whose process fails: launch reports it, the leaderboard marks it, its log has the exit code."""
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), executor="debug",
                       grid={"rope.factor": [2, 4]})
    sweep = sweep_lib.load_sweep(path)
    jobs = [sweep_lib.make_job(sweep, r) for r in sweep.runs]
    jobs[1].command = [jobs[1].command[0], "-c", "import sys; print('boom'); sys.exit(3)"]
    jobs[0].command = [jobs[0].command[0], "-c", "pass"]
    assert sweep_lib.launch(sweep, sweep.runs, jobs) == {"factor-2": "done", "factor-4": "failed"}
    rows = {r["run"]: r for r in sweep_lib.collect(sweep, {"factor-4": "failed"})}
    assert rows["factor-4"]["status"] == "failed" and rows["factor-2"]["status"] == "new"  # no final/ on disk
    log = (tmp_path / "out" / "logs" / "factor-4.log").read_text()
    assert "boom" in log and "factor-4: exit code 3" in log


def test_run_still_running_on_this_machine_is_not_started_twice(base, tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), executor="debug",
                       grid={"rope.factor": [2]})
    run_dir = tmp_path / "out" / "factor-2"
    run_dir.mkdir(parents=True)
    (run_dir / sweep_lib.RUNNING).write_text(json.dumps({"host": hostname(), "pids": pid_stamps([os.getpid()])}))
    rc, out, _ = sweep_cli(capsys, path)
    assert rc == 0 and f"still queued or running as process {os.getpid()}" in out
    assert not (tmp_path / "out" / "logs" / "factor-2.log").exists()
    (run_dir / sweep_lib.RUNNING).write_text(json.dumps({"host": hostname(), "pids": {"1": 0.0}}))  # stale
    assert sweep_lib.running_here(run_dir) is None


def test_slurm_executor_without_slurm_exits_2(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), executor="slurm")
    rc, _, err = sweep_cli(capsys, path)
    assert rc == 2 and "sbatch/srun not found on PATH" in err


def test_slurm_job_array_script(base, tmp_path, monkeypatch, capsys):
    """Submit through submitit's SlurmExecutor with stand-in sbatch/srun/squeue, then read what it wrote."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool, body in {"sbatch": 'echo "Submitted batch job 4242"', "srun": "exit 0",
                       "squeue": 'cat "$(dirname "$0")/queue" 2>/dev/null; exit 0'}.items():
        (bin_ / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / tool).chmod((bin_ / tool).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(tmp_path / "s.yaml", base=str(base), output_dir=str(tmp_path / "out"), executor="slurm",
                       overrides={"train.report_to": ["wandb"]},
                       grid={"rope.rope_type": ["linear", "yarn"], "rope.factor": [2, 4]},
                       slurm={"partition": "gpu", "account": "lab", "nodes": 2, "gpus_per_node": 4,
                              "cpus_per_task": 32, "mem_gb": 256, "time_min": 90, "signal_delay_s": 120,
                              "array_parallelism": 2, "setup": ["module load cuda"]})
    rc, out, err = sweep_cli(capsys, path)
    assert rc == 0, err
    (script,) = (tmp_path / "out" / "logs" / "submitit").rglob("*_submission.sh")
    text = script.read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --signal=USR1@120", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=256GB",
                 "#SBATCH --requeue", "#SBATCH --job-name=out", "export SUBMITIT_PREEMPT_SIGNAL=USR1",
                 "module load cuda", "srun --unbuffered", "-m submitit.core._submit"):
        assert line in text, (line, text)
    ids = json.loads((tmp_path / "out" / "logs" / "slurm_jobs.json").read_text())
    assert sorted(ids.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    # the pickled job of array task 1 runs torchrun over 2 nodes x 4 GPUs with its run's overrides
    from submitit.core.utils import DelayedSubmission

    pkl = next((tmp_path / "out" / "logs" / "submitit").rglob("4242_1_submitted.pkl"))
    job = DelayedSubmission.load(pkl).function
    argv = job.argv(node=1, hostnames=["gpu-a", "gpu-b"], job_id="4242_1")
    joined = " ".join(argv)
    assert "-m torch.distributed.run --nproc_per_node 4 --nnodes 2 --node_rank 1 --rdzv_backend c10d" in joined
    assert "--rdzv_endpoint gpu-a:" in joined and argv[argv.index("--rdzv_id") + 1] == "4242_1"
    assert f"train.py {base} train.resume=auto " in joined
    assert joined.endswith(f" train.output_dir={tmp_path / 'out' / job.name}")  # last: no override can move it
    assert job.env["WANDB_RUN_GROUP"] == "out" and hasattr(job, "checkpoint")
    # a rerun while the array is still queued submits nothing
    (bin_ / "queue").write_text("4242_[0-3%2]\n")
    rc, out, _ = sweep_cli(capsys, path)
    assert rc == 0 and out.count("still queued or running as SLURM job") == 4
    assert len(list((tmp_path / "out" / "logs" / "submitit").rglob("*_submission.sh"))) == 1
