"""Training run: Hugging Face Trainer built from the config, scaled RoPE + S2 through `longctx.apply`.

    python train.py configs/quickstart.yaml train.max_steps=10
    torchrun --nproc_per_node 2 train.py configs/quickstart.yaml train.deepspeed=configs/deepspeed/zero2.json

What Trainer does not do and we add, each as a small callback or a method:
- embed/norm weights (LongLoRA+) saved in every checkpoint and in RUN/final (LongLoRA #53, #98, #123 lost them);
- the checkpoint protocol (longctx/rundir.py): checkpoints marked complete, with a manifest of their files and the
  run id, only after every rank wrote its part; rotation only after that; `resume: auto` takes the newest intact
  complete checkpoint of this run (Trainer writes checkpoint-N in place, so a killed save leaves a half-written
  directory behind, and its own rotation deletes old checkpoints before the new one is complete);
- one live run per run directory (rank 0 claims it), a finished run reruns as a no-op, never a step past max_steps;
- resume refused when shape-defining fields changed;
- SIGTERM / SIGUSR1 (cluster preemption) -> checkpoint at the end of the step, exit 0; handlers restored afterwards;
- a NaN or inf loss stops the run with a clear message before the optimizer step touches the weights;
- tokens/s and the global batch in the logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import longctx
from longctx import data as data_lib
from longctx import dist, rundir
from longctx import evaluate
from longctx import loss as loss_lib
from longctx import model as model_lib
from longctx import patch, plan
from longctx import sequence_parallel as sp
from longctx.config import Config, ConfigError, train_problems

log = logging.getLogger("longctx")

# Fields that define parameter shapes or the meaning of positions: a resume must not change them.
SHAPE_FIELDS = ("model.name_or_path", "model.gguf_file", "model.quantization", "lora.enabled", "lora.r",
                "lora.target_modules", "lora.trainable_params", "rope", "method", "train.seq_len", "attention.type")


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

@dataclass
class Start:
    """Where a run starts, decided by the main process under the run directory's claim."""

    checkpoint: Path | None  # continue from it; None: from step 0
    run_id: str  # made at a fresh start, kept across resumes (in every completion marker)
    finished: Path | None = None  # final/ of a run already at train.max_steps: nothing to train
    set_aside: list[Path] = field(default_factory=list)  # moved to RUN/superseded/ before training
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint name -> why resume passed over it


def resolve_resume(cfg: Config) -> Start:
    """Where the run starts. Reads the run directory and changes nothing (`prepare_run_dir` acts on the answer).

    - off: a new run; what an earlier run left here (checkpoints, final/, eval/) is set aside, never mixed in;
    - a path: that checkpoint, which must be intact (ConfigError naming the file otherwise);
    - auto: a finished run (final/ of this run at train.max_steps or beyond) stays finished; else the newest
      complete checkpoint that is of this directory's run, intact, and not past train.max_steps, each one passed
      over with its reason; complete checkpoints but none usable is an error, no checkpoint a fresh start.
    """
    t, run = cfg.train, Path(cfg.train.output_dir)
    current = rundir.read_run_id(run)
    if t.resume in (None, "off", "false", "no"):
        return Start(None, _new_run_id(), set_aside=_earlier_run(run))
    if t.resume != "auto":
        return _explicit_resume(Path(t.resume), run, current)
    final = rundir.final_dir(run)
    info = rundir.read_info(final)
    if info is not None and (current is None or info.get("run_id") in (None, current)) \
            and info.get("steps", 0) >= t.max_steps:
        return Start(None, current or info.get("run_id") or _new_run_id(), finished=final)
    skipped, chosen = {}, None
    for ckpt in reversed(rundir.complete_checkpoints(run)):  # newest first
        why = _unusable(ckpt, current, t.max_steps)
        if why is None:
            chosen = ckpt
            break
        skipped[ckpt.name] = why
    if chosen is None and skipped:
        lines = "\n".join(f"  - {name}: {why}" for name, why in skipped.items())
        raise ConfigError(f"train.resume=auto: no checkpoint in {run} can be resumed:\n{lines}\ncontinue from one "
                          f"written by an older longctx with train.resume=PATH, or start over with train.resume=off "
                          f"(the old files move to {rundir.superseded_dir(run)})")
    if chosen is None and info is not None:
        raise ConfigError(f"train.max_steps={t.max_steps}: {final} holds step {info.get('steps')} and no checkpoint is "
                          f"left to continue from; start over with train.resume=off (final/ moves to "
                          f"{rundir.superseded_dir(run)}) or choose another train.output_dir")
    if chosen is None:
        return Start(None, _new_run_id())
    run_id = (rundir.read_complete(chosen) or {}).get("run_id") or current or _new_run_id()
    return Start(chosen, run_id, set_aside=[run / name for name in skipped], skipped=skipped)


def _unusable(ckpt: Path, current: str | None, max_steps: int) -> str | None:
    """Why `resume: auto` must not continue from a complete checkpoint, None when it may."""
    step = rundir.checkpoint_step(ckpt)
    if step > max_steps:
        return f"step {step} is past train.max_steps={max_steps}"
    run_id = (rundir.read_complete(ckpt) or {}).get("run_id")
    if current is not None and run_id is not None and run_id != current:
        return f"it belongs to run {run_id}, and {rundir.RUN_INFO} says this directory holds run {current}"
    return rundir.verify(ckpt)


def _explicit_resume(path: Path, run: Path, current: str | None) -> Start:
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} does not exist or is not a checkpoint directory")
    marker = rundir.read_complete(path) or {}
    problem = rundir.verify(path)
    if problem and not (marker and "files" not in marker):  # a marker without manifest: older longctx, below
        raise ConfigError(f"train.resume: {path} cannot be resumed: {problem}")
    if problem:
        log.warning("train.resume: %s was written by an older longctx: %s; its files are not verified", path,
                    problem)
    run_id = marker.get("run_id") or current or _new_run_id()
    if path.resolve().parent == run.resolve():  # later checkpoints of this directory would be overwritten
        step = rundir.checkpoint_step(path)
        later = [c for c in rundir.checkpoints(run) if step is not None and rundir.checkpoint_step(c) > step]
        return Start(path, run_id, set_aside=[c for c in later if rundir.is_complete(c)])
    return Start(path, run_id, set_aside=_earlier_run(run))  # what this directory holds is another run's


def _earlier_run(run: Path) -> list[Path]:
    """What a run that trained in `run` left there, when it left checkpoints, final/ or eval/ (with its config.yaml
    and run.json, so the set-aside directory says what it was)."""
    results = rundir.checkpoints(run) + [p for p in (rundir.final_dir(run), rundir.eval_dir(run)) if p.exists()]
    if not results:
        return []
    return results + [p for p in (run / rundir.CONFIG, rundir.run_info_path(run)) if p.exists()]


def _new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def prepare_run_dir(cfg: Config) -> Start:
    """The main process, holding the claim: decide where the run starts, say why, and tidy the run directory for
    it (set aside what must not be mixed in, remove the leftovers of killed saves and deletions)."""
    start = resolve_resume(cfg)
    run = Path(cfg.train.output_dir)
    for name, why in start.skipped.items():
        log.warning("not resuming from %s: %s", name, why)
    if start.finished is not None:
        return start
    if start.checkpoint is not None:
        check_resume_compatible(cfg, start.checkpoint)
    if start.set_aside:
        dest = rundir.set_aside(run, start.set_aside, rundir.read_run_id(run) or "earlier")
        log.warning("moved %s out of the way, to %s", ", ".join(p.name for p in start.set_aside), dest)
    gone = rundir.remove_leftovers(run)
    if gone:
        log.warning("ignoring incomplete checkpoint(s) %s (killed while saving or deleting): removed", ", ".join(gone))
    if start.checkpoint is not None:
        log.info("resuming from %s (run %s)", start.checkpoint, start.run_id)
    else:
        log.info("starting run %s at step 0 in %s", start.run_id, run)
    rundir.write_run_id(run, start.run_id)
    return start


def _clear_final(run: Path) -> None:
    """Before final/ is written: a complete final/ of earlier training and eval/ are set aside (final/ is never
    overwritten silently), an incomplete one (a killed save) is removed."""
    final, ev = rundir.final_dir(run), rundir.eval_dir(run)
    info = rundir.read_info(final)
    if info is None and final.exists():
        shutil.rmtree(final)
    old = [p for p in (final, ev) if p.exists()]
    if old:
        dest = rundir.set_aside(run, old, "final")
        log.warning("%s of earlier training (final/ at step %s) moved to %s", " and ".join(p.name + "/" for p in old),
                    (info or {}).get("steps", "?"), dest)


def check_resume_compatible(cfg: Config, checkpoint: Path) -> None:
    saved_path = checkpoint / rundir.CHECKPOINT_CONFIG
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    now = cfg.model_dump(mode="json")
    changed = [f for f in SHAPE_FIELDS if _get(saved, f) != _get(now, f)]
    if changed:
        lines = "\n".join(f"  - {f}: checkpoint has {_get(saved, f)!r}, config has {_get(now, f)!r}" for f in changed)
        raise ConfigError(f"train.resume: {checkpoint} was trained with a different shape-defining config:\n{lines}\n"
                          f"use a new train.output_dir, or set train.resume=off to start over")


def _get(d: dict, dotted: str):
    """The value at a dotted key, with None-valued keys of a section dropped (a key left out and a key set to null
    mean the same; runs from before the rope schema became a union dumped every rope key)."""
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return {k: v for k, v in d.items() if v is not None} if isinstance(d, dict) else d


# ---------------------------------------------------------------------------------------------------------------
# Callbacks

class CheckpointExtras(TrainerCallback):
    """Adds the embed/norm weights and the config to every checkpoint, marks it complete (its manifest and the run
    id, rundir.write_complete), and only then deletes checkpoints beyond the newest `keep` (train.save_total_limit).
    Trainer's own rotation stays off: it deletes old checkpoints inside its save, before this marker exists, so a
    kill between the two left no complete checkpoint (issue 18)."""

    def __init__(self, config_yaml: str, run_id: str, keep: int | None = None):
        self.config_yaml, self.run_id, self.keep = config_yaml, run_id, keep

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = rundir.checkpoint_dir(args.output_dir, state.global_step)
        state_dict = trainable_state(model)  # collective under ZeRO-3: every rank calls it
        dist.barrier()
        if dist.is_main():
            if state_dict:
                save_file({k: v.contiguous() for k, v in state_dict.items()}, str(ckpt / rundir.TRAINABLE))
            (ckpt / rundir.CHECKPOINT_CONFIG).write_text(self.config_yaml)
            rundir.write_complete(ckpt, state.global_step, self.run_id)
            if self.keep:
                gone = rundir.rotate(args.output_dir, self.keep)
                if gone:
                    log.info("deleted %s (train.save_total_limit=%d)", ", ".join(gone), self.keep)
        dist.barrier()


class AtMaxSteps(Exception):
    """The checkpoint a run resumed from is already at train.max_steps."""


class NoStepPastMaxSteps(TrainerCallback):
    """Trainer resumed at max_steps takes one more step (it checks the limit only after a step): stop it before.
    Trainer has loaded the checkpoint by on_train_begin, so final/ can be written from it (issue 18 item 4)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise AtMaxSteps(f"the checkpoint is at step {state.global_step}, train.max_steps={state.max_steps}")


class Throughput(TrainerCallback):
    """Logs tokens/s (all ranks) and the global batch once."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.t0 = None
        self.step0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.t0 is not None:
            steps = state.global_step - self.step0
            if steps > 0:
                logs["tokens_per_s"] = round(steps * self.tokens_per_step / (time.perf_counter() - self.t0), 1)
                # Trainer.log appended a copy of `logs` to log_history before calling us: add it there too, so
                # trainer_state.json in every checkpoint carries the throughput.
                last = state.log_history[-1] if state.log_history else {}
                if last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                    last["tokens_per_s"] = logs["tokens_per_s"]


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(TrainerCallback):
    """SIGTERM / SIGUSR1: finish the step, save a checkpoint, stop; the run then exits 0. Installs its handlers when
    built; `restore()` puts the previous ones back (train() does when it ends, however it ends)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(float(self.requested))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)  # every rank must stop at the same step, or a collective hangs
        if flag.item() > 0:
            self.requested = True
            control.should_save = True
            control.should_training_stop = True


class Stopped(Exception):
    """SIGTERM or SIGUSR1 arrived inside `stop_on_signals()`."""


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block SIGTERM / SIGUSR1 raise Stopped at once (where Preemption lets a training step finish and
    save): for work that is simply redone by a rerun, such as the evaluation after training. Handlers restored."""
    def handle(signum, frame):
        raise Stopped(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handle) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LongctxTrainer(Trainer):
    """Trainer that refuses to step on a NaN/inf loss (Trainer's own filter would only hide it in the logs) and,
    with `chunked_loss`, computes the training loss without materialising all logits (longctx/loss.py)."""

    def __init__(self, *args, chunked_loss: bool = False, loss_chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size
        self._chunked_verified = False
        self.sp_resume_step = 0  # under sequence parallelism, the step of the checkpoint resumed from (train())

    def get_train_dataloader(self):
        dl = super().get_train_dataloader()
        if self.sp_resume_step and sp.enabled(self.accelerator):
            dl = sp.skip_trained_batches(dl, self.sp_resume_step, self.args.gradient_accumulation_steps,
                                         self.accelerator.parallelism_config.sp_size)
        return dl

    def _plain_loss_instead(self, reason: str) -> None:
        self.chunked_loss = False
        if dist.is_main():
            log.warning("train.chunked_loss: using the plain loss (all logits) because %s", reason)

    def _output_head(self, model) -> torch.nn.Linear | None:
        """The lm_head the chunked loss stands in for, or None (then the plain loss, said once)."""
        base = self.accelerator.unwrap_model(model)
        head = loss_lib.plain_output_head(base)
        if head is None:
            self._plain_loss_instead("the output head is not a plain float nn.Linear (quantized, LoRA-adapted or "
                                     "wrapped)")
            return None
        if hasattr(head.weight, "ds_id"):
            # Under ZeRO-3 the weight is a shard that DeepSpeed gathers only inside the module's own forward; the
            # chunked loss reads it outside, so keep the plain path there.
            self._plain_loss_instead("DeepSpeed ZeRO-3 partitions the lm_head weight")
            return None
        return head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's causal-LM loss, computed as transformers does, but from the hidden states in chunks.

        The model runs as usual (its wrappers: DDP/DeepSpeed, accelerate's autocast, PEFT) with its lm_head passing
        its input through, so no logits are built; then `loss.causal_lm_loss` with the lm_head's weight, in the
        dtype the lm_head would have computed in. Same num_items_in_batch handling as Trainer.compute_loss."""
        if model.training and "shift_labels" in inputs and not return_outputs and sp.enabled(self.accelerator):
            return self._sequence_parallel_loss(model, inputs)
        if (not self.chunked_loss or return_outputs or not model.training or "labels" not in inputs
                or self.label_smoother is not None or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        head = self._output_head(model)
        if head is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels, shift_labels = inputs.pop("labels"), inputs.pop("shift_labels", None)
        with loss_lib.lm_head_passthrough(head) as seen:
            outputs = model(**inputs)
        if not self._chunked_verified:
            # The model must hand the lm_head's output back unchanged as its logits (no softcapping or scaling
            # after the head); checked once on the first batch.
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            hidden = seen.get("hidden")
            if hidden is None or not (logits is hidden or (logits.shape == hidden.shape and torch.equal(
                    logits.detach().to(hidden.dtype), hidden.detach()))):
                self._plain_loss_instead("this model changes its logits after the lm_head (or does not call it)")
                del outputs, seen
                return super().compute_loss(model, inputs | {"labels": labels} |
                                            ({"shift_labels": shift_labels} if shift_labels is not None else {}),
                                            return_outputs, num_items_in_batch)
            self._chunked_verified = True
            if dist.is_main():
                liger = hidden.is_cuda and importlib.util.find_spec("liger_kernel") is not None
                log.info("train.chunked_loss: %s", "Liger fused linear cross-entropy" if liger else
                         f"chunked lm_head + cross-entropy, {self.loss_chunk_size} tokens per chunk")
        loss = loss_lib.causal_lm_loss(
            seen["hidden"], head.weight, labels, bias=head.bias, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch if self.model_accepts_loss_kwargs else None,
            chunk_size=self.loss_chunk_size, compute_dtype=seen["dtype"])
        del outputs
        # As Trainer.compute_loss: with average_tokens_across_devices num_items_in_batch is the global count.
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu
        return loss

    def _sequence_parallel_loss(self, model, inputs):
        """Under sequence parallelism (issue 12): this shard's loss over its shifted labels (chunked as above when
        train.chunked_loss is on), token-weighted over the SP group by `sp.token_weighted_mean`, where transformers'
        own SP loss would build all of the shard's logits and give P times the gradients."""
        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")
        inputs.pop("labels", None)
        scale = sp.zero_gradient_scale(getattr(self.accelerator, "deepspeed_config", None) or {},
                                       self.accelerator.parallelism_config.sp_size)
        head = self._output_head(model) if self.chunked_loss else None
        if head is not None:
            with loss_lib.lm_head_passthrough(head) as seen:
                outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if seen.get("hidden") is not None and logits is seen["hidden"]:
                total = loss_lib.causal_lm_loss(seen["hidden"], head.weight, bias=head.bias, shift_labels=shift_labels,
                                                num_items_in_batch=1, chunk_size=self.loss_chunk_size,
                                                compute_dtype=seen["dtype"])  # the sum over the shard's tokens
                return sp.token_weighted_mean(total, (shift_labels != -100).sum(), grad_scale=scale)
            self._plain_loss_instead("this model changes its logits after the lm_head (or does not call it)")
        logits = model(**inputs)["logits"]
        total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device),
                                                  ignore_index=-100, reduction="sum")
        return sp.token_weighted_mean(total, (shift_labels != -100).sum(), grad_scale=scale)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"loss is {loss.item()} at step {self.state.global_step + 1}; the run stops here, the "
                                f"last good checkpoint stays in {self.args.output_dir} (lower train.learning_rate, "
                                "check the data, or use bf16 instead of fp16)")
        return loss


def zero3_gathered(model, modify: bool = False):
    """Under ZeRO-3 the embed/norm parameters are partitioned across ranks (a rank holds a shape-(0,) shard):
    gather them whole for saving (modify=False) or loading (modify=True, rank 0's values are scattered back).
    A no-op without ZeRO-3."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The embed/norm weights, whole and on the CPU, also under ZeRO-3 (every rank must call this)."""
    with zero3_gathered(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model_lib.trainable_state_dict(model).items()}


# ---------------------------------------------------------------------------------------------------------------
# The run

def training_arguments(cfg: Config) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=t.output_dir, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        bf16=t.bf16, fp16=t.fp16, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointExtras rotates (train.save_total_limit) once the new checkpoint is complete
        seed=t.seed, data_seed=t.seed, deepspeed=t.deepspeed,
        report_to=t.report_to or "none", dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False, logging_nan_inf_filter=False, disable_tqdm=not dist.is_main(),
        gradient_checkpointing=False,  # model_lib.prepare_for_training enables it (non-reentrant)
        save_only_model=False, use_cpu=not torch.cuda.is_available(),
        **sp.training_arguments(t.sequence_parallel_size, dist.world_size(), t.seq_len),  # issue 12
    )


def train(cfg: Config, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Run training from a validated config; returns RUN/final, or RUN when a signal stopped training (rerun the
    same command to go on). The run directory stays claimed by this process until it exits (`rundir.release`).
    `callbacks` join the trainer's own (scripts/bench_sp.py measures memory from the start of training with one)."""
    run_dir = Path(cfg.train.output_dir)
    problems = train_problems(cfg)  # dynamic RoPE, training-free methods (sweep's dry run checks the same)
    P = cfg.train.sequence_parallel_size
    problems += sp.world_problems(P, dist.world_size())  # before TrainingArguments (issue 12)
    if problems:
        raise ConfigError("\n".join(problems))
    # TrainingArguments before the model: under ZeRO-3 transformers then loads the weights already partitioned
    # (zero.Init) instead of a full copy per rank. Building them also starts torch.distributed under torchrun.
    if cfg.train.deepspeed and dist.world_size() > 1:
        import deepspeed

        deepspeed.init_distributed()  # zero.Init (below) reads the world size when the model is built
    args = training_arguments(cfg)
    m = cfg.model
    model_config = model_lib.read_config(m.name_or_path, m.gguf_file, m.trust_remote_code)  # exit 2 before writing
    patch.check_supported(model_config)
    problems = sp.model_problems(P, model_config)  # its family and heads, before the weights load (issue 12)
    if problems:
        raise ConfigError("\n".join(problems))
    dist.on_main(lambda: rundir.claim(run_dir))  # one live run per directory: rank 0 holds it, all ranks stop if taken
    start = dist.on_main(lambda: prepare_run_dir(cfg))
    if start.finished is not None:
        if dist.is_main():
            log.info("%s is finished: final/ holds step %s (train.max_steps=%d); nothing to train", run_dir,
                     rundir.read_info(start.finished).get("steps"), cfg.train.max_steps)
        return start.finished
    if dist.is_main():
        (run_dir / rundir.CONFIG).write_text(cfg.to_yaml())
    if "wandb" in cfg.train.report_to:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"  # no key: the run lands under RUN/wandb, sync it later

    set_seed(cfg.train.seed)  # before the model exists: LoRA's A matrices are drawn at init
    world = args.world_size
    if dist.is_main():  # advice only: one WARNING line when the predicted peak won't fit
        plan.warn_if_too_big(model_config, world, **plan.plan_arguments(cfg))
    tokenizer = model_lib.load_tokenizer(m.tokenizer or m.name_or_path, gguf_file=m.gguf_file,
                                         trust_remote_code=m.trust_remote_code)
    model = model_lib.load_model(m.name_or_path, dtype=m.dtype, quantization=m.quantization, gguf_file=m.gguf_file,
                                 trust_remote_code=m.trust_remote_code)
    model = model_lib.prepare_for_training(model, gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.lora.enabled:
        try:
            model = model_lib.add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                       target_modules=cfg.lora.target_modules,
                                       trainable_params=cfg.lora.trainable_params)
        except ValueError as e:  # a target module or trainable_params substring the model does not have
            raise ConfigError(f"lora: {e}") from None
    handle = longctx.apply(model, rope=cfg.rope_dict(), attention=cfg.attention_dict(), method=cfg.method_dict())
    if P > 1:
        sp.prepare(handle, P, dist.rank())
    checkpoint = start.checkpoint
    if checkpoint is not None and (checkpoint / rundir.TRAINABLE).is_file():
        with zero3_gathered(model, modify=True):
            model_lib.load_trainable_state_dict(model, load_file(str(checkpoint / rundir.TRAINABLE)))
    trainable, total = model_lib.count_parameters(model)

    train_ds = build_dataset(cfg, tokenizer, "train")
    dp = sp.data_parallel_size(P, world)  # the P processes of an SP group train on the same sequences
    tokens_per_step = cfg.train.seq_len * cfg.train.per_device_train_batch_size * \
        cfg.train.gradient_accumulation_steps * dp
    if dist.is_main():
        log.info("trainable %s / %s parameters (%.2f%%); global batch %d x %d x %d = %d sequences of %d tokens%s",
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, cfg.train.per_device_train_batch_size,
                 cfg.train.gradient_accumulation_steps, dp, tokens_per_step // cfg.train.seq_len,
                 cfg.train.seq_len, f" (sequence parallel: {P} processes per sequence)" if P > 1 else "")
    preemption = Preemption()
    try:
        callbacks = [NoStepPastMaxSteps(), CheckpointExtras(cfg.to_yaml(), start.run_id, cfg.train.save_total_limit),
                     Throughput(tokens_per_step), preemption, *callbacks]
        trainer = LongctxTrainer(
            model=model, args=args, train_dataset=train_ds,
            data_collator=_collator(tokenizer, P), callbacks=callbacks,
            chunked_loss=cfg.train.chunked_loss, loss_chunk_size=cfg.train.loss_chunk_size,
        )
        if cfg.eval.lengths:  # ppl@L every eval.every steps and at the last step, to the trainer's loggers
            e = cfg.eval
            trainer.add_callback(evaluate.training_callback(
                lambda: evaluate.run_eval_tokens(cfg, tokenizer), e.lengths, trainer.log, every=e.every,
                stride=e.stride, max_tokens=e.max_tokens))
        if checkpoint is not None and P > 1:  # Trainer cannot skip batches under DeepSpeed's SP adapter (issue 12)
            trainer.args.ignore_data_skip = True
            trainer.sp_resume_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except AtMaxSteps as e:
            if dist.is_main():
                log.info("%s: writing final/ from %s without another step", e, checkpoint.name)
        if preemption.requested and trainer.state.global_step < cfg.train.max_steps:
            if dist.is_main():
                log.warning("preempted: checkpoint saved in %s; rerun the same command to resume", run_dir)
            return run_dir
        if dist.is_main():
            _clear_final(run_dir)
        dist.barrier()
        final = save_final(cfg, trainer, handle, tokenizer, run_id=start.run_id)
        if preemption.requested:  # at the last step, or while final/ was written: the evaluation is left to a rerun
            if dist.is_main():
                log.warning("stopped by a signal at the last step: final/ written; rerun the same command to evaluate")
            return run_dir
        return final
    finally:
        preemption.restore()


def _collator(tokenizer, P: int):
    if P == 1:
        return data_lib.DataCollator(tokenizer.pad_token_id)
    return sp.PositionIds(data_lib.DataCollator(tokenizer.pad_token_id, pad_to_multiple_of=P))


def build_dataset(cfg: Config, tokenizer, split: str):
    d = cfg.data
    common = dict(text_field=d.text_field, hub_config=d.hub_config, hub_split=d.hub_split, suffixes=d.suffixes,
                  seed=cfg.train.seed, skip_bad_rows=d.skip_bad_rows, num_proc=d.num_proc)
    if d.format == "sft":
        return data_lib.build_sft_dataset(d.train_sources(), tokenizer, cfg.train.seq_len,
                                          prompt_template=d.prompt_template, template=d.template, train_on=d.train_on,
                                          overlong=d.overlong, pack=d.pack, **common)
    # without data.eval, evaluation reads the validation split of data.train: hold it out of training (issue 18)
    return data_lib.build_pretrain_dataset(d.train_sources(), tokenizer, cfg.train.seq_len,
                                           split=None if d.eval else split, min_doc_tokens=d.min_doc_tokens,
                                           document_aware=d.document_aware, **common)


def save_final(cfg: Config, trainer: Trainer, handle, tokenizer, run_id: str | None = None) -> Path:
    """RUN/final: adapter (or full weights) with the embed/norm weights as PEFT's modules_to_save, tokenizer and
    longctx.json, written last (final/ without it is incomplete), with the base config values that plain PEFT
    needs (rope_parameters, max_position_embeddings). A local base model is recorded as an absolute path (a hub id
    as it is), so final/ evaluates and exports from any working directory."""
    final = rundir.final_dir(cfg.train.output_dir)
    trainer.save_model(str(final))
    state_dict = trainable_state(trainer.model) if cfg.lora.enabled else {}
    if dist.is_main():
        if state_dict and not model_lib.add_modules_to_save(final, trainer.model, state_dict):
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(final / rundir.TRAINABLE))  # longctx's
        tokenizer.save_pretrained(str(final))
        info = {"base_model": model_lib.absolute_source(cfg.model.name_or_path), "gguf_file": cfg.model.gguf_file,
                "run_id": run_id, "cwd": os.getcwd(),
                "train_seq_len": cfg.train.seq_len, "target_length": cfg.target_length, "lora": cfg.lora.enabled,
                **handle.longctx_json(),
                "max_position_embeddings": getattr(trainer.model.config, "max_position_embeddings", None),  # ALiBi: none
                "steps": trainer.state.global_step, "config": cfg.model_dump(mode="json")}
        rundir.info_path(final).write_text(json.dumps(info, indent=1))
        log.info("final model in %s", final)
    dist.barrier()
    return final
