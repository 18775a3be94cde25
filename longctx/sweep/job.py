"""One job: a run as a trainer process, what submitit pickles and runs (locally, in-process or on a SLURM node)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from longctx import rundir
from longctx.sweep.names import override_text
from longctx.sweep.spec import Run, Sweep
from longctx.sweep.state import RUNNING, hostname, last_checkpoint, pid_stamps

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"
CLI = "import sys; from longctx.cli import main; sys.exit(main(sys.argv[1:]))"  # `python -c CLI eval ppl ...`
PREEMPT_SIGNAL = "USR1"  # SLURM's warning signal (--signal=USR1@delay); the trainer saves and exits 0 on it


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
                lock.write_text(json.dumps({"host": hostname(), "pids": pid_stamps([os.getpid(), proc.pid])}))
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
            raise RuntimeError(f"run {self.name} failed (exit code {rc}); log: {log_path}\n{log_tail(log_path)}")
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


def log_tail(path: Path, n: int = 15) -> str:
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
    """`longctx eval ppl` arguments for a training-free run: the base model with this run's rope and method."""
    cfg = run.config
    d = cfg.data  # what a training run evaluates: data.eval whole, else the validation split of data.train
    train = d.train_sources()
    data = ["--data", d.eval] if d.eval else ["--data", *([train] if isinstance(train, str) else
                                                          [s["path"] for s in train]), "--split", "validation"]
    args = ["eval", "ppl", "--model", cfg.model.name_or_path, "--lengths", ",".join(map(str, cfg.eval.lengths)),
            *data, "--dtype", cfg.model.dtype, "--out", str(rundir.eval_dir(run.dir))]
    if cfg.eval.max_tokens:
        args += ["--max-tokens", str(cfg.eval.max_tokens)]
    if cfg.eval.stride:
        args += ["--stride", str(cfg.eval.stride)]
    rope = cfg.rope_dict()
    if rope:
        args += ["--rope", *(f"{k}={override_text(v)}" for k, v in rope.items())]
    method = cfg.method_dict()
    if method:
        args += ["--method", method.pop("name"), *(f"{k}={override_text(v)}" for k, v in method.items())]
    return args
