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

Each run is its own process, `python train.py BASE train.output_dir=OUTPUT/<name> train.resume=auto k=v ...`
(`torchrun` over the job's nodes and GPUs on SLURM), so runs are isolated from each other and from the launcher,
and every launch of a run is a resume: a rerun skips finished runs and continues interrupted ones. On SLURM the
runs are one job array; SIGUSR1 before the time limit is forwarded to the trainer (which saves a checkpoint and
exits 0) and submitit requeues the job, which resumes.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longctx.config import Config, ConfigError, load_config

log = logging.getLogger("longctx")

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
CLI = "import sys; from longctx.cli import main; sys.exit(main(sys.argv[1:]))"  # `python -c CLI eval ppl ...`
COMPLETE = "longctx_complete.json"  # = longctx.trainer.COMPLETE (not imported here: it pulls in transformers)
RUNNING = ".sweep_running.json"  # in a run directory while a job of this machine runs it: {host, pids}
PREEMPT_SIGNAL = "USR1"  # SLURM's warning signal (--signal=USR1@delay); the trainer saves and exits 0 on it


# ---------------------------------------------------------------------------------------------------------------
# The sweep file

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlurmSettings(_Strict):
    partition: str | None = Field(None, description="SLURM partition.")
    account: str | None = Field(None, description="SLURM account.")
    nodes: int = Field(1, description="Nodes per run; each node starts one torchrun.")
    gpus_per_node: int = Field(8, description="GPUs per node = processes per torchrun.")
    cpus_per_task: int | None = Field(None, description="CPUs per node (one task per node).")
    mem_gb: float | None = Field(None, description="Memory per node in GB.")
    time_min: int = Field(24 * 60, description="Time limit per job in minutes; jobs requeue themselves past it.")
    array_parallelism: int = Field(64, description="Runs of the job array at once.")
    signal_delay_s: int = Field(300, description="SIGUSR1 this many seconds before the time limit.")
    max_requeues: int = Field(20, description="Requeues after hitting the time limit (preemptions do not count).")
    setup: list[str] = Field([], description="Shell lines run before each job (module load, source a venv).")
    additional_parameters: dict[str, Any] = Field({}, description="Other #SBATCH flags, e.g. {qos: high}.")


class SweepFile(_Strict):
    base: str = Field(description="The base config every run starts from.")
    output_dir: str = Field(description="Run directories, logs and the leaderboard go here.")
    name: str | None = Field(None, description="Sweep name (wandb group, SLURM job name); default: output_dir's name.")
    executor: Literal["local", "slurm", "debug"] = Field("local", description="Where the runs execute.")
    mode: Literal["train", "eval"] = Field("train", description="train: train then evaluate; eval: evaluate the "
                                                                "base model with each run's rope (training-free).")
    overrides: dict[str, Any] = Field({}, description="Dotted keys applied to every run.")
    grid: dict[str, list[Any]] = Field({}, description="Dotted key -> values; the runs are the cartesian product.")
    runs: list[dict[str, Any]] = Field([], description="Explicit runs (override dicts); combined with every grid point.")
    max_parallel: int = Field(1, description="local: runs at once.")
    slurm: SlurmSettings = SlurmSettings()


@dataclass
class Run:
    name: str
    own: dict[str, Any]  # the overrides that make this run differ from the others
    dir: Path
    args: list[str]  # every dotted override given to train.py, in order
    config: Config


@dataclass
class Sweep:
    file: SweepFile
    path: Path
    base: Path
    output_dir: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.file.name or self.output_dir.name

    @property
    def logs(self) -> Path:
        return self.output_dir / "logs"


def load_sweep(path: str | Path, executor: str | None = None) -> Sweep:
    """Read and check a sweep file, expand its runs and validate every run's config (nothing is launched)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path}: the top level must be a mapping (base, output_dir, grid, ...)")
    if executor is not None:
        raw["executor"] = executor
    try:
        sf = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid sweep file {path}:\n" + "\n".join("  - " + m for m in _messages(e))) from None
    problems = _file_problems(sf)
    if problems:
        raise ConfigError(f"invalid sweep file {path}:\n" + "\n".join("  - " + m for m in problems))
    sweep = Sweep(file=sf, path=path, base=Path(sf.base).resolve(), output_dir=Path(sf.output_dir).resolve())
    sweep.runs = expand(sweep)
    return sweep


def _messages(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            model = SlurmSettings if err["loc"][0] == "slurm" else SweepFile
            valid = list(model.model_fields)
            key = str(err["loc"][-1])
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5) or [v for v in valid if v.startswith(key)]
            prefix = "".join(f"{x}." for x in err["loc"][:-1])
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            out.append(f"{loc}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif err["type"] == "missing":
            out.append(f"{loc}: required key is missing")
        else:
            out.append(f"{loc}: {err['msg']}, got {err.get('input')!r}")
    return out


def _file_problems(sf: SweepFile) -> list[str]:
    out = [f"grid.{k}: empty list; give at least one value" for k, v in sf.grid.items() if not v]
    for i, run in enumerate(sf.runs):
        both = sorted(set(run) & set(sf.grid))
        if both:
            out.append(f"runs[{i}]: {', '.join(both)} also in grid; a key is either swept by the grid or set per run")
    for where, keys in [("overrides", sf.overrides), ("grid", sf.grid)] + [(f"runs[{i}]", r)
                                                                         for i, r in enumerate(sf.runs)]:
        if "train.output_dir" in keys:
            out.append(f"{where}.train.output_dir: set by the sweep (OUTPUT/<run name>); use output_dir instead")
    if sf.max_parallel < 1:
        out.append(f"max_parallel: must be >= 1, got {sf.max_parallel}")
    s = sf.slurm
    for key in ("nodes", "gpus_per_node", "time_min", "array_parallelism"):
        if getattr(s, key) < 1:
            out.append(f"slurm.{key}: must be >= 1, got {getattr(s, key)}")
    if not 0 <= s.signal_delay_s < s.time_min * 60:
        out.append(f"slurm.signal_delay_s: must be in [0, time_min * 60), got {s.signal_delay_s}")
    if not Path(sf.base).is_file():
        out.append(f"base: config file not found: {sf.base}")
    return out


def expand(sweep: Sweep) -> list[Run]:
    """The runs: grid points x explicit runs, named from their own overrides; every config validated."""
    sf = sweep.file
    keys = list(sf.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*sf.grid.values())] if keys else [{}]
    owns = [{**p, **r} for r in (sf.runs or [{}]) for p in points]
    names = _names(owns)
    runs, errors = [], {}
    for name, own in zip(names, owns):
        run_dir = sweep.output_dir / name
        args = [f"train.output_dir={run_dir}", "train.resume=auto"] + \
               [f"{k}={_yaml(v)}" for k, v in {**sf.overrides, **own}.items()]
        try:
            cfg = load_config(sweep.base, overrides=args)
        except ConfigError as e:
            lines = str(e).splitlines()
            for line in (lines[1:] if lines[0].startswith("invalid config") else lines):
                errors.setdefault(line.strip().removeprefix("- "), []).append(name)
            continue
        if sf.mode == "eval" and not cfg.eval.lengths:
            errors.setdefault("eval.lengths: an eval sweep needs evaluation lengths", []).append(name)
        runs.append(Run(name=name, own=own, dir=run_dir, args=args, config=cfg))
    if errors:
        lines = [f"  - {msg} ({'all runs' if len(who) == len(owns) > 1 else 'run ' + ', '.join(who)})"
                 for msg, who in errors.items()]
        raise ConfigError(f"sweep {sweep.path}: invalid run config (base {sf.base}):\n" + "\n".join(lines))
    return runs


def _yaml(v: Any) -> str:
    """A value as the YAML text of a dotted override: plain when YAML reads it back as the same string, else JSON
    (which is YAML)."""
    if isinstance(v, str) and v.strip() == v and v:
        try:
            if yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}-{_fmt(x)}" for k, x in v.items())
    return str(v)


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else _fmt(v)


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("_") or "run"
    name = "_" + name[1:] if name.startswith(".") else name
    return name if len(name) <= 120 else name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def run_name(own: dict[str, Any], full_keys: bool = False) -> str:
    """rope.rope_type=yarn, rope.factor=4 -> 'rope_type-yarn__factor-4' (filesystem-safe)."""
    if not own:
        return "base"
    return _safe("__".join(f"{k if full_keys else k.split('.')[-1]}-{_fmt(v)}" for k, v in own.items()))


def _names(owns: list[dict[str, Any]]) -> list[str]:
    """Unique directory names: short keys, full dotted keys where short ones collide, then -2, -3, ..."""
    for i, own in enumerate(owns):
        if own in owns[:i]:
            raise ConfigError(f"sweep: the run {own} appears twice (the grid and runs give the same overrides)")
    short = [run_name(o) for o in owns]
    names = [run_name(o, full_keys=True) if short.count(n) > 1 else n for o, n in zip(owns, short)]
    out: list[str] = []
    for name in names:
        unique, k = name, 1
        while unique in out:
            k += 1
            unique = f"{name}-{k}"
        out.append(unique)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Run state on disk

def last_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint-<step> (the one train.resume=auto picks)."""
    done = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
            and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def is_finished(run: Run, mode: str) -> bool:
    has_eval = (run.dir / "eval" / "ppl.json").is_file()
    if mode == "eval":
        return has_eval
    return (run.dir / "final" / "longctx.json").is_file() and (has_eval or not run.config.eval.lengths)


def run_state(run: Run, mode: str) -> str:
    if is_finished(run, mode):
        return "done"
    ckpt = last_checkpoint(run.dir) if mode == "train" else None
    return f"resume from {ckpt.name}" if ckpt else "new"


# ---------------------------------------------------------------------------------------------------------------
# One job: what submitit pickles and runs (locally, in-process or on a SLURM node)

class Job:
    """A run as a subprocess; `checkpoint` (submitit's preemption hook) stops it cleanly and resubmits itself."""

    def __init__(self, name: str, command: list[str], run_dir: Path, log: Path, env: dict[str, str], cwd: str,
                 torchrun: dict[str, int] | None = None, stop_timeout_s: float = 600):
        self.name, self.command, self.run_dir, self.log = name, command, run_dir, log
        self.env, self.cwd, self.torchrun, self.stop_timeout_s = env, cwd, torchrun, stop_timeout_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        return {**self.__dict__, "_proc": None}

    def argv(self, node: int = 0, hostnames: list[str] | None = None, job_id: str = "0") -> list[str]:
        """The command this node runs: `python train.py ...`, or torchrun over nodes x gpus_per_node."""
        if not self.torchrun:
            return self.command
        nnodes, nproc = self.torchrun["nodes"], self.torchrun["gpus_per_node"]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if nnodes == 1:
            launch.append("--standalone")
        else:
            port = 20000 + int(hashlib.sha1(job_id.encode()).hexdigest(), 16) % 20000
            launch += ["--nnodes", str(nnodes), "--node_rank", str(node), "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", f"{(hostnames or ['localhost'])[0]}:{port}", "--rdzv_id", job_id]
        return launch + self.command[1:]  # command[0] is the python executable

    def __call__(self) -> str:
        node, hostnames, job_id = _job_environment()
        argv = self.argv(node, hostnames, job_id)
        log_path = self.log if node == 0 else self.log.with_name(f"{self.log.stem}.node{node}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ckpt = last_checkpoint(self.run_dir)
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: "
                      f"{'resuming from ' + ckpt.name if ckpt else 'starting'} (job {job_id}, node {node})\n"
                      f"[sweep] $ {shlex.join(argv)}\n")
            out.flush()
            proc = self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                                 env={**os.environ, **self.env}, start_new_session=True,
                                                 preexec_fn=_die_with_parent)
            lock = self.run_dir / RUNNING
            if node == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                lock.write_text(json.dumps({"host": _host(), "pids": _pid_stamps([os.getpid(), proc.pid])}))
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
            finally:  # also on SystemExit after a requeue, on Ctrl-C and on cancel
                if proc.poll() is None:
                    _stop(proc, signal.SIGTERM, self.torchrun is not None, timeout=60)
                if node == 0:
                    lock.unlink(missing_ok=True)
            rc = proc.returncode
            out.write(f"\n[sweep] {self.name}: exit code {rc}\n")
        if rc != 0:
            raise RuntimeError(f"run {self.name} failed (exit code {rc}); log: {log_path}\n{_tail(log_path)}")
        return str(self.run_dir)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preemption or time limit (submitit calls this on the preemption signal): forward SIGUSR1 to the trainer,
        which saves a checkpoint at the end of its step and exits; then requeue this same job (it resumes)."""
        import submitit

        with open(self.log, "a", encoding="utf-8") as out:
            out.write(f"[sweep] {self.name}: preemption signal; stopping the trainer with SIG{PREEMPT_SIGNAL} "
                      f"and requeueing\n")
        if self._proc is not None:
            _stop(self._proc, getattr(signal, "SIG" + PREEMPT_SIGNAL), self.torchrun is not None,
                  timeout=self.stop_timeout_s)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _host() -> str:
    import socket

    return socket.gethostname()


def _pid_stamps(pids: list[int]) -> dict[str, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[str(pid)] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass
    return out


def running_here(run_dir: Path) -> str | None:
    """'process PID' when a job on this machine is still running this run (or its trainer still saving)."""
    import psutil

    info = _read_json(run_dir / RUNNING)
    if not isinstance(info, dict) or info.get("host") != _host():
        return None
    for pid, created in (info.get("pids") or {}).items():
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - created) < 1 and p.status() != psutil.STATUS_ZOMBIE:
                return f"process {pid}"
        except (psutil.Error, ValueError):
            continue
    return None


def _job_environment() -> tuple[int, list[str], str]:
    """(node rank, hostnames, job id) inside a submitit job; defaults outside one."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        return env.node, list(env.hostnames), str(env.job_id)
    except RuntimeError:
        return 0, ["localhost"], str(os.getpid())


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the job process dies (the trainer then saves a checkpoint and exits)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen, sig: int, torchrun: bool, timeout: float) -> None:
    """Send `sig` to the trainer processes (torchrun's workers, or the process itself), wait, then kill."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent] + parent.children(recursive=True)
        targets = parent.children() if torchrun else [parent]
    except psutil.NoSuchProcess:
        return
    for p in targets or [parent]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    # os.waitpid directly: this may run inside a signal handler that interrupted Popen.poll (which holds a lock)
    deadline = time.time() + timeout
    while proc.returncode is None and time.time() < deadline:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            break
        time.sleep(0.2)
    while any(_alive(p) for p in family[1:]) and time.time() < deadline:
        time.sleep(0.2)
    for p in family:
        if _alive(p):
            p.kill()


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def make_job(sweep: Sweep, run: Run, torchrun: bool | None = None) -> Job:
    """The job for one run; torchrun over slurm.nodes x slurm.gpus_per_node on SLURM (train mode)."""
    cfg, sf = run.config, sweep.file
    if sf.mode == "train":
        command = [sys.executable, str(TRAIN_SCRIPT), str(sweep.base), *run.args]
    else:
        command = [sys.executable, "-c", CLI, *eval_args(run)]
    env = {"PYTHONUNBUFFERED": "1"}
    if "wandb" in cfg.train.report_to:
        env["WANDB_RUN_GROUP"] = sweep.name
    if sf.executor == "local" and sf.max_parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // sf.max_parallel))
    use_torchrun = (sf.executor == "slurm" and sf.mode == "train") if torchrun is None else torchrun
    s = sf.slurm
    return Job(run.name, command, run.dir, sweep.logs / f"{run.name}.log", env, os.getcwd(),
               torchrun={"nodes": s.nodes, "gpus_per_node": s.gpus_per_node} if use_torchrun else None,
               stop_timeout_s=max(10, s.signal_delay_s - 30) if sf.executor == "slurm" else 600)


def eval_args(run: Run) -> list[str]:
    """`longctx eval ppl` arguments for a training-free run: the base model with this run's rope."""
    cfg = run.config
    split = "train" if cfg.data.eval else "validation"
    args = ["eval", "ppl", "--model", cfg.model.name_or_path, "--lengths", ",".join(map(str, cfg.eval.lengths)),
            "--data", cfg.data.eval or cfg.data.train, "--split", split, "--dtype", cfg.model.dtype,
            "--out", str(run.dir / "eval")]
    if cfg.eval.max_tokens:
        args += ["--max-tokens", str(cfg.eval.max_tokens)]
    if cfg.eval.stride:
        args += ["--stride", str(cfg.eval.stride)]
    rope = cfg.rope_dict()
    if rope:
        args += ["--rope", *(f"{k}={_yaml(v)}" for k, v in rope.items())]
    return args


# ---------------------------------------------------------------------------------------------------------------
# Executors

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


# ---------------------------------------------------------------------------------------------------------------
# Leaderboard

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
    state = _read_json(ckpt / "trainer_state.json") if ckpt else None
    for entry in (state or {}).get("log_history", []):
        if "loss" in entry:
            out["train_loss"] = entry["loss"]
        if "tokens_per_s" in entry:
            out["tokens_per_s"] = entry["tokens_per_s"]
    out["steps"] = (state or {}).get("global_step")
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(sweep: Sweep, status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per run: its overrides, status, PPL per length, passkey accuracy, train loss, tokens/s. `status`
    (failed, submitted, queued/running) is shown for runs that are not finished on disk."""
    keys = list(dict.fromkeys(k for r in sweep.runs for k in r.own))
    rows = []
    for run in sweep.runs:
        ppl = _read_json(run.dir / "eval" / "ppl.json") or {}
        passkey = _read_json(run.dir / "eval" / "passkey.json")
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


# ---------------------------------------------------------------------------------------------------------------
# CLI

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
        own = " ".join(f"{k}={_show(v)}" for k, v in r.own.items())
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
