"""Test-only launcher: `python tests/fault_train.py PHASE@STEP CONFIG [key=value ...]` is `longctx train` with one
fault injected at a chosen moment, for tests/test_faults.py.

The product has no test hook: this wraps product functions from outside before the CLI runs, so the fault lands
at the same instruction every time (a timed `kill` from the test would race the save it means to interrupt).
SIGKILL is what the process sends itself where the phase says "kill": no handler, no cleanup, like `kill -9`, an
OOM kill or a node failure. The phases, at the checkpoint save of global step STEP unless said otherwise:

    model    kill inside Trainer's save: model files written, optimizer/scheduler/RNG/trainer state not
    extras   kill after Trainer's save (its own rotation included, when it has one), before our on_save
    marker   kill after the embed/norm weights and config are written, before the completion marker
    rotate   kill after the marker, before rotation deletes anything
    delete   kill during rotation: the old checkpoint renamed to *.deleting, not yet deleted
    final    kill when final/ is about to be written (the checkpoint at STEP is complete)
    step     SIGTERM during training step STEP (as a scheduler's preemption)
    eval     SIGTERM during the first perplexity window of the evaluation after training
"""

import functools
import os
import signal
import sys

from transformers import Trainer

from longctx import evaluate, rundir, trainer
from longctx.cli import main


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name: str, before) -> None:
    """owner.name(*args) runs `before(*args)` first."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def inject(phase: str, step: int) -> None:
    rotating = {}
    if phase == "model":
        wrap(Trainer, "_save_optimizer_and_scheduler", lambda self, *a: self.state.global_step == step and kill())
    elif phase == "extras":
        wrap(trainer.CheckpointExtras, "on_save", lambda self, args, state, *a, **k: state.global_step == step and kill())
    elif phase == "marker":
        wrap(rundir, "write_complete", lambda ckpt, at, *a: at == step and kill())
    elif phase == "rotate":
        wrap(rundir, "rotate", lambda run, keep: rundir.checkpoint_step(rundir.complete_checkpoints(run)[-1]) == step
             and kill())
    elif phase == "delete":
        wrap(rundir, "rotate", lambda run, keep: rotating.update(step=rundir.checkpoint_step(
            rundir.complete_checkpoints(run)[-1])))
        wrap(rundir.shutil, "rmtree", lambda path, *a, **k: str(path).endswith(rundir.DELETING)
             and rotating.get("step") == step and kill())
    elif phase == "final":
        wrap(trainer, "save_final", lambda cfg, tr, *a, **k: tr.state.global_step == step and kill())
    elif phase == "step":
        wrap(trainer.LongctxTrainer, "training_step",
             lambda self, *a, **k: self.state.global_step == step - 1 and os.kill(os.getpid(), signal.SIGTERM))
    elif phase == "eval":
        in_eval = {}
        wrap(evaluate, "eval_run", lambda *a, **k: in_eval.update(on=True))
        wrap(evaluate, "perplexity", lambda *a, **k: in_eval.get("on") and os.kill(os.getpid(), signal.SIGTERM))
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    phase, _, at = sys.argv[1].partition("@")
    inject(phase, int(at or 0))
    sys.exit(main(["train", *sys.argv[2:]]))
