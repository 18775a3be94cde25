"""Fault injection: the checkpoint protocol's promises (README "Resume and preemption"), each broken on purpose.

A kill at every phase of a save, with and without rotation; two runs on one directory (one process, torchrun);
a corrupt or truncated file of every kind in the newest checkpoint; reruns of finished and stopped runs;
`resume: off` in a used directory; SIGTERM during the evaluation after training. The faults are injected by
tests/fault_train.py (SIGKILL or SIGTERM at a chosen function of the product, from outside it).
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from longctx import rundir
from micro import trained_extras
from longctx.config import ConfigError, load_config
from longctx.sweep.state import running_here
from longctx.trainer import resolve_resume

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, train_config, out: Path, **train) -> Path:
    """4 steps of 1 x 128 tokens, a checkpoint every 2."""
    cfg = train_config(out, train={"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 1, **train})
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *overrides: str, fault: str | None = None, timeout: float = 600,
           **kw) -> subprocess.CompletedProcess:
    script = [str(ROOT / "tests" / "fault_train.py"), fault] if fault else [str(ROOT / "train.py")]
    return subprocess.run([sys.executable, *script, str(config), *overrides], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def names(paths) -> list[str]:
    return [p.name for p in paths]


def final_steps(run: Path) -> int:
    return json.loads((run / "final" / "longctx.json").read_text())["steps"]


def trained_steps(run: Path) -> list[int]:
    """Every step any checkpoint's trainer_state logged a loss for (a step past max_steps would show here)."""
    return sorted({e["step"] for p in run.glob("checkpoint-*/trainer_state.json")
                   for e in json.loads(p.read_text())["log_history"] if "loss" in e})


@pytest.fixture(scope="module")
def done(train_config, tmp_path_factory):
    """A finished 4-step run: checkpoint-2, checkpoint-4, final/."""
    d = tmp_path_factory.mktemp("done")
    config = write_config(d / "c.yaml", train_config, d / "run")
    ok(launch(config))
    return d / "run"


def copy_run(done: Path, dest: Path, train_config, keep_final: bool = True, **train) -> Path:
    """A copy of the finished run in `dest`/run and its config (output_dir pointing at the copy)."""
    shutil.copytree(done, dest / "run", ignore=shutil.ignore_patterns(rundir.CLAIM))
    if not keep_final:
        shutil.rmtree(dest / "run" / "final")
    return write_config(dest / "c.yaml", train_config, dest / "run", **train)


# ---------------------------------------------------------------------------------------------------------------
# Item 1: a kill at each phase of a save never leaves zero complete checkpoints; resume picks the newest intact one

PHASES = [  # (phase, train.save_total_limit, the checkpoint resume must pick after a kill in the save of step 4)
    ("model", None, "checkpoint-2"), ("extras", None, "checkpoint-2"), ("marker", None, "checkpoint-2"),
    ("model", 1, "checkpoint-2"), ("extras", 1, "checkpoint-2"), ("marker", 1, "checkpoint-2"),
    ("rotate", 1, "checkpoint-4"), ("delete", 1, "checkpoint-4"),
]


@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
@pytest.mark.parametrize("phase,limit,expected", PHASES, ids=[f"{p}-limit{lim}" for p, lim, _ in PHASES])
def test_a_kill_at_any_phase_of_a_save_leaves_a_complete_checkpoint(train_config, tmp_path, phase, limit, expected):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run,
                          **({"save_total_limit": limit} if limit else {}))
    proc = launch(config, fault=f"{phase}@4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run / "final").exists()
    start = resolve_resume(load_config(config))
    assert start.checkpoint is not None and start.checkpoint.name == expected
    assert rundir.verify(start.checkpoint) is None
    if phase == "delete":  # the old checkpoint was renamed out of the checkpoint namespace before deletion began
        assert (run / "checkpoint-2.deleting").is_dir() and names(rundir.checkpoints(run)) == ["checkpoint-4"]


@pytest.mark.slow  # two trainer processes: over 20 s
@pytest.mark.parametrize("phase,expected", [("extras", "checkpoint-2"), ("delete", "checkpoint-4")])
def test_the_rerun_after_a_killed_save_continues_and_tidies_up(train_config, tmp_path, phase, expected):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run, save_total_limit=1)
    assert launch(config, fault=f"{phase}@4").returncode == -signal.SIGKILL
    again = ok(launch(config))
    assert f"resuming from {run / expected}" in again.stderr
    assert final_steps(run) == 4 and trained_steps(run) == [1, 2, 3, 4]
    assert names(run.glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1, no *.deleting left


# ---------------------------------------------------------------------------------------------------------------
# Item 2: one live run per run directory

@pytest.mark.slow  # two trainer processes: over 20 s
def test_a_second_run_on_a_busy_directory_is_refused(train_config, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run, max_steps=10_000, save_steps=10_000)
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(config)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / rundir.RUN_INFO).exists():  # written under the claim
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.1)
        assert running_here(run) == f"host {__import__('socket').gethostname()}, pid {first.pid}"  # the sweep sees it
        second = launch(config, "train.max_steps=2")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"train.output_dir: {run} is in use by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert running_here(run) is None  # the kernel dropped the claim with the process


@pytest.mark.slow  # torchrun: two processes importing torch and transformers, about 30 s on 2 CPU cores
def test_under_torchrun_every_rank_exits_2_when_the_directory_is_taken(train_config, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run)
    rundir.claim(run)  # this test process holds it
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               str(ROOT / "train.py"), str(config)], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
    finally:
        rundir.release(run)
    message = f"error: train.output_dir: {run} is in use by another run"
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]  # both ranks, no hang
    assert "exitcode  : 2" in proc.stderr and not list(run.glob("checkpoint-*"))


@pytest.mark.slow  # two probe subprocesses: about 5 s, the end-to-end layer
def test_the_claim_is_refused_while_held_and_free_after_release(tmp_path):
    run = tmp_path / "run"
    rundir.claim(run)
    probe = ("import sys; from longctx import rundir; from longctx.config import ConfigError\n"
             "print(rundir.holder(sys.argv[1]))\n"
             "try:\n    rundir.claim(sys.argv[1], wait_s=0.2)\nexcept ConfigError as e:\n    print(e)\n")
    try:
        held = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, timeout=120)
    finally:
        rundir.release(run)
    import os

    assert f"pid {os.getpid()}" in held.stdout.splitlines()[0] and "is in use by another run" in held.stdout
    free = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, timeout=120)
    assert free.stdout.splitlines() == ["None"], free.stderr[-2000:]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        rundir.claim(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------------------
# Item 3: a checkpoint is wholly of this run; resume=off into a used directory

@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
def test_resume_off_in_a_used_directory_never_continues_the_old_run(done, train_config, tmp_path):
    config = copy_run(done, tmp_path, train_config, seed=8)
    run = tmp_path / "run"
    old_id = rundir.read_run_id(run)
    proc = launch(config, "train.resume=off", fault="marker@2")  # the new run dies writing its first checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "moved checkpoint-2, checkpoint-4, final, config.yaml, run.json out of the way" in proc.stderr
    aside = next((run / rundir.SUPERSEDED).iterdir())
    assert aside.name.endswith(old_id) and names(sorted(aside.iterdir())) == [
        "checkpoint-2", "checkpoint-4", "config.yaml", "final", "run.json"]
    assert rundir.read_run_id(run) != old_id
    start = resolve_resume(load_config(config))  # resume=auto now: nothing of the new run is complete
    assert start.checkpoint is None and start.finished is None
    assert not rundir.is_complete(run / "checkpoint-2")


@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
def test_a_checkpoint_of_another_run_is_not_resumed(done, train_config, tmp_path):
    config = copy_run(done, tmp_path, train_config, keep_final=False)
    run = tmp_path / "run"
    rundir.write_run_id(run, "someotherrun")
    with pytest.raises(ConfigError, match="checkpoint-4: it belongs to run [0-9a-f]+, and run.json says this "
                                          "directory holds run someotherrun"):
        resolve_resume(load_config(config))


# ---------------------------------------------------------------------------------------------------------------
# Item 9: a truncated or corrupt file of any kind in the newest checkpoint

FILES = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "trainer_state.json", "training_args.bin", "trainable_params.safetensors", "longctx_config.yaml",
         "README.md", rundir.COMPLETE]


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed in the middle: only the checksum sees it
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1:])


@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", FILES)
def test_a_broken_file_in_the_newest_checkpoint_falls_back_or_exits_2(done, train_config, tmp_path, name, how):
    assert sorted(FILES) == sorted(names((done / "checkpoint-4").iterdir()))  # every kind the run writes
    config = copy_run(done, tmp_path, train_config, keep_final=False)
    run = tmp_path / "run"
    corrupt(run / "checkpoint-4" / name, how)
    start = resolve_resume(load_config(config))
    assert start.checkpoint == run / "checkpoint-2" and name in start.skipped["checkpoint-4"]
    with pytest.raises(ConfigError, match=f"train.resume: {run / 'checkpoint-4'} cannot be resumed: {name}"):
        resolve_resume(load_config(config, overrides=[f"train.resume={run / 'checkpoint-4'}"]))


@pytest.mark.slow  # two trainer processes: over 20 s
def test_a_corrupt_optimizer_state_end_to_end(done, train_config, tmp_path):
    config = copy_run(done, tmp_path, train_config, keep_final=False)
    run = tmp_path / "run"
    corrupt(run / "checkpoint-4" / "optimizer.pt", "flip")
    explicit = launch(config, f"train.resume={run / 'checkpoint-4'}")
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert "optimizer.pt does not match its checksum" in explicit.stderr
    auto = ok(launch(config))
    assert "not resuming from checkpoint-4: optimizer.pt does not match its checksum" in auto.stderr
    assert f"resuming from {run / 'checkpoint-2'}" in auto.stderr
    assert final_steps(run) == 4 and rundir.verify(run / "checkpoint-4") is None  # rewritten from step 2
    assert names(next((run / rundir.SUPERSEDED).iterdir()).iterdir()) == ["checkpoint-4"]  # the broken one, kept


# ---------------------------------------------------------------------------------------------------------------
# Item 4: a finished run reruns as a no-op; one stopped at its last step writes final/ without another step

@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
def test_a_finished_run_reruns_as_a_no_op(done, train_config, tmp_path):
    config = copy_run(done, tmp_path, train_config)
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rundir.CLAIM}
    proc = ok(launch(config))
    assert f"{run} is finished: final/ holds step 4 (train.max_steps=4); nothing to train" in proc.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rundir.CLAIM}
    assert after == before  # nothing trained, nothing written


@pytest.mark.slow  # a trainer subprocess: the end-to-end layer
def test_sigterm_at_the_last_step_writes_final_without_another_step(train_config, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run)
    proc = ok(launch(config, fault="step@4"))
    assert "stopped by a signal at the last step: final/ written" in proc.stderr
    assert final_steps(run) == 4 and trained_steps(run) == [1, 2, 3, 4]


@pytest.mark.slow  # two trainer processes: over 20 s
def test_a_run_killed_before_final_writes_it_from_its_last_checkpoint(train_config, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run)
    assert launch(config, fault="final@4").returncode == -signal.SIGKILL
    assert not (run / "final").exists() and rundir.verify(run / "checkpoint-4") is None
    proc = ok(launch(config))
    assert "writing final/ from checkpoint-4 without another step" in proc.stderr
    assert final_steps(run) == 4 and trained_steps(run) == [1, 2, 3, 4]
    ckpt = load_file(str(run / "checkpoint-4" / rundir.TRAINABLE))
    final = trained_extras(run / "final")
    assert all((ckpt[k] == final[k]).all() for k in ckpt)  # exactly the checkpoint's weights


# ---------------------------------------------------------------------------------------------------------------
# Item 8: SIGTERM during the evaluation after training

@pytest.mark.slow  # two trainer processes: over 20 s
def test_sigterm_during_evaluation_exits_0_and_a_rerun_finishes_it(train_config, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", train_config, run)
    evaluation = ["eval.lengths=[64,128]", "eval.max_tokens=200"]
    proc = ok(launch(config, *evaluation, fault="eval@4"))
    assert "received SIGTERM during the evaluation: stopped; rerun the same command to finish it" in proc.stderr
    assert final_steps(run) == 4 and not (run / "eval" / "ppl.json").exists()
    adapter = (run / "final" / "adapter_model.safetensors").read_bytes()
    again = ok(launch(config, *evaluation))
    assert "is finished" in again.stderr  # not trained again
    assert set(json.loads((run / "eval" / "ppl.json").read_text())) == {"base", "extended"}
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == adapter and trained_steps(run) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Issue 16 item 3: train() leaves the process's signal handlers as it found them, however it ends

@pytest.mark.slow  # two training runs in this process: the end-to-end layer
def test_signal_handlers_are_restored_when_training_ends(train_config, tmp_path, monkeypatch):
    from longctx import trainer as trainer_lib

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in trainer_lib.PREEMPTION_SIGNALS}
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", train_config, tmp_path / "run", max_steps=1))
        assert trainer_lib.train(cfg).name == "final"
        assert all(signal.getsignal(sig) is mine for sig in trainer_lib.PREEMPTION_SIGNALS)

        def fail(*args, **kwargs):
            raise RuntimeError("a save that fails")

        monkeypatch.setattr(trainer_lib.CheckpointExtras, "on_save", fail)
        cfg = load_config(write_config(tmp_path / "c2.yaml", train_config, tmp_path / "run2", max_steps=1))
        with pytest.raises(RuntimeError, match="a save that fails"):
            trainer_lib.train(cfg)
        assert all(signal.getsignal(sig) is mine for sig in trainer_lib.PREEMPTION_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        rundir.release(tmp_path / "run")
        rundir.release(tmp_path / "run2")
