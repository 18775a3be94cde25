"""Executors: submitit's local, SLURM (one job array) and debug (in-process) executors, and launching jobs on them."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

from longctx.config import ConfigError
from longctx.sweep.job import PREEMPT_SIGNAL, Job, make_job
from longctx.sweep.spec import Run, Sweep

log = logging.getLogger("longctx")


def make_executor(sweep: Sweep):
    """submitit executor: LocalExecutor, SlurmExecutor (job array) or DebugExecutor (in-process)."""
    import submitit

    sf, s = sweep.file, sweep.file.slurm
    if sf.executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("executor slurm: sbatch/srun not found on PATH; run the sweep on a SLURM login node, or "
                          "use --executor local")
    folder = sweep.logs / "submitit" / "%j"
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"]  # submitit's handler listens to SIGUSR1 then
    if sf.executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=s.max_requeues)
        ex.update_parameters(
            name=sweep.name, timeout_min=s.time_min, nodes=s.nodes if sf.mode == "train" else 1, tasks_per_node=1,
            gpus_per_node=s.gpus_per_node,
            cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb, slurm_partition=s.partition, slurm_account=s.account,
            slurm_array_parallelism=s.array_parallelism, slurm_signal_delay_s=s.signal_delay_s,
            slurm_setup=setup + s.setup,
            slurm_additional_parameters={"signal": f"{PREEMPT_SIGNAL}@{s.signal_delay_s}", "requeue": True,
                                         **s.additional_parameters})
        return ex
    if sf.executor == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        ex.update_parameters(timeout_min=60 * 24 * 365, local_setup=setup)
        return ex
    return submitit.AutoExecutor(folder=folder, cluster="debug")


def launch(sweep: Sweep, runs: list[Run], jobs: list[Job] | None = None) -> dict[str, str]:
    """Run the jobs: {run name: 'done' | 'failed' | 'submitted'}. SLURM: submit one job array and return."""
    jobs = jobs or [make_job(sweep, r) for r in runs]
    if not jobs:
        return {}
    sweep.logs.mkdir(parents=True, exist_ok=True)
    executor = make_executor(sweep)
    kind = sweep.file.executor
    if kind == "slurm":
        with executor.batch():
            submitted = [executor.submit(j) for j in jobs]
        record = sweep.logs / "slurm_jobs.json"
        ids = json.loads(record.read_text()) if record.is_file() else {}
        ids.update({j.name: s.job_id for j, s in zip(jobs, submitted)})
        record.write_text(json.dumps(ids, indent=1))
        log.info("submitted %d run(s) as SLURM job array %s", len(jobs), submitted[0].job_id.split("_")[0])
        return {j.name: "submitted" for j in jobs}
    results: dict[str, str] = {}
    pending, running = list(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < sweep.file.max_parallel:
                job = pending.pop(0)
                log.info("start %s (log: %s)", job.name, job.log)
                running[job.name] = (job, executor.submit(job))
                if kind == "debug":
                    break  # runs in-process when its result is asked for, below
            for name, (job, sj) in list(running.items()):
                if kind == "debug" or sj.done():
                    err = sj.exception()
                    results[name] = "done" if err is None else "failed"
                    log.info("%s %s", name, "done" if err is None else f"FAILED (log: {job.log})")
                    del running[name]
            if running:
                time.sleep(1)
    except KeyboardInterrupt:
        for _, sj in running.values():
            sj.cancel(check=False)
        raise
    return results


def active_slurm_jobs(sweep: Sweep) -> dict[str, str]:
    """Runs of an earlier submission still queued or running on SLURM: {run name: job id}."""
    import getpass

    record = sweep.logs / "slurm_jobs.json"
    if not record.is_file():
        return {}
    try:
        out = subprocess.run(["squeue", "--noheader", "--format=%i", f"--user={getpass.getuser()}"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    queued = set(out.stdout.split())  # running array tasks as 123_4, pending ones as 123_[5-9%2]
    pending_arrays = {q.split("_[")[0] for q in queued if "_[" in q}
    return {name: f"SLURM job {i}" for name, i in json.loads(record.read_text()).items()
            if i in queued or i.split("_")[0] in pending_arrays}
