"""Training run: Hugging Face Trainer built from the config, scaled RoPE + S2 through `longctx.apply`.

    python train.py configs/quickstart.yaml train.max_steps=10
    torchrun --nproc_per_node 2 train.py configs/quickstart.yaml train.deepspeed=configs/deepspeed/zero2.json

What Trainer does not do and we add, each as a small callback or a method:
- embed/norm weights (LongLoRA+) saved in every checkpoint and in RUN/final (LongLoRA #53, #98, #123 lost them);
- checkpoints marked complete only after every rank wrote its part, and `resume: auto` takes the newest complete
  one (Trainer writes checkpoint-N in place, so a killed save leaves a half-written directory behind);
- resume refused when shape-defining fields changed;
- SIGTERM / SIGUSR1 (cluster preemption) -> checkpoint at the end of the step, exit 0;
- a NaN or inf loss stops the run with a clear message before the optimizer step touches the weights;
- tokens/s and the global batch in the logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import longctx
from longctx import data as data_lib
from longctx import evaluate
from longctx import loss as loss_lib
from longctx import model as model_lib
from longctx import plan
from longctx.config import Config, ConfigError

log = logging.getLogger("longctx")

COMPLETE = "longctx_complete.json"  # written last, atomically: a checkpoint without it is ignored
TRAINABLE = "trainable_params.safetensors"  # the LongLoRA+ embed/norm weights
# Fields that define parameter shapes or the meaning of positions: a resume must not change them.
SHAPE_FIELDS = ("model.name_or_path", "model.gguf_file", "model.quantization", "lora.enabled", "lora.r",
                "lora.target_modules", "lora.trainable_params", "rope", "train.seq_len", "attention.type")


class NonFiniteLoss(RuntimeError):
    pass


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-<step> directories that finished saving, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    resume = cfg.train.resume
    if resume in (None, "off", "false", "no"):
        return None
    run_dir = Path(cfg.train.output_dir)
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        partial = [p.name for p in run_dir.glob("checkpoint-*") if p not in done]
        if partial:
            log.warning("ignoring incomplete checkpoint(s) %s (killed while saving)", ", ".join(sorted(partial)))
        return done[-1] if done else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"train.resume: {path} is not a complete longctx checkpoint (no {COMPLETE})")
    return path


def check_resume_compatible(cfg: Config, checkpoint: Path) -> None:
    saved_path = checkpoint / "longctx_config.yaml"
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
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


# ---------------------------------------------------------------------------------------------------------------
# Callbacks

class CheckpointExtras(TrainerCallback):
    """Adds the embed/norm weights, the config and a completion marker to every checkpoint."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        state_dict = trainable_state(model)  # collective under ZeRO-3: every rank calls it
        _barrier()
        if is_main_process():
            if state_dict:
                save_file({k: v.contiguous() for k, v in state_dict.items()}, str(ckpt / TRAINABLE))
            (ckpt / "longctx_config.yaml").write_text(self.cfg.to_yaml())
            tmp = ckpt / (COMPLETE + ".tmp")
            tmp.write_text(json.dumps({"step": state.global_step, "time": time.time()}))
            os.replace(tmp, ckpt / COMPLETE)
        _barrier()


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


class Preemption(TrainerCallback):
    """SIGTERM / SIGUSR1: finish the step, save a checkpoint, stop; the run then exits 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

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


class LongctxTrainer(Trainer):
    """Trainer that refuses to step on a NaN/inf loss (Trainer's own filter would only hide it in the logs) and,
    with `chunked_loss`, computes the training loss without materialising all logits (longctx/loss.py)."""

    def __init__(self, *args, chunked_loss: bool = False, loss_chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size
        self._chunked_verified = False

    def _plain_loss_instead(self, reason: str) -> None:
        self.chunked_loss = False
        if is_main_process():
            log.warning("train.chunked_loss: using the plain loss (all logits) because %s", reason)

    def _output_head(self, model) -> torch.nn.Linear | None:
        """The lm_head the chunked loss stands in for, or None (then the plain loss, said once)."""
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
            self._plain_loss_instead(f"the output head is a {type(head).__name__}, not a plain nn.Linear "
                                     "(quantized, LoRA-adapted or wrapped)")
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
            if is_main_process():
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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
        save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed, deepspeed=t.deepspeed,
        report_to=t.report_to or "none", dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False, logging_nan_inf_filter=False, disable_tqdm=not is_main_process(),
        gradient_checkpointing=False,  # model_lib.prepare_for_training enables it (non-reentrant)
        save_only_model=False, use_cpu=not torch.cuda.is_available(),
    )


def train(cfg: Config) -> Path:
    """Run training from a validated config; returns RUN/final."""
    run_dir = Path(cfg.train.output_dir)
    if cfg.rope.rope_type == "dynamic":
        raise ConfigError("rope.rope_type: dynamic changes with batch length and is not KV-cache consistent; train "
                          "with a static type (linear, ntk, yarn, llama3, longrope) and keep dynamic for evaluation")
    checkpoint = resolve_resume(cfg)
    if checkpoint is not None:
        check_resume_compatible(cfg, checkpoint)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if "wandb" in cfg.train.report_to:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"  # no key: the run lands under RUN/wandb, sync it later

    set_seed(cfg.train.seed)  # before the model exists: LoRA's A matrices are drawn at init
    # TrainingArguments before the model: under ZeRO-3 transformers then loads the weights already partitioned
    # (zero.Init) instead of a full copy per rank.
    if cfg.train.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed

        deepspeed.init_distributed()  # zero.Init (below) reads the world size when the model is built
    args = training_arguments(cfg)
    world = args.world_size
    if is_main_process():
        plan.warn_if_too_big(cfg, world)  # advice only: one WARNING line when the predicted peak won't fit
    m = cfg.model
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
    handle = longctx.apply(model, rope=cfg.rope_dict(), attention=cfg.attention_dict())
    if checkpoint is not None and (checkpoint / TRAINABLE).is_file():
        with zero3_gathered(model, modify=True):
            model_lib.load_trainable_state_dict(model, load_file(str(checkpoint / TRAINABLE)))
    trainable, total = model_lib.count_parameters(model)

    train_ds = _dataset(cfg, tokenizer, "train")
    tokens_per_step = cfg.train.seq_len * cfg.train.per_device_train_batch_size * \
        cfg.train.gradient_accumulation_steps * world
    if is_main_process():
        log.info("trainable %s / %s parameters (%.2f%%); global batch %d x %d x %d = %d sequences of %d tokens",
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, cfg.train.per_device_train_batch_size,
                 cfg.train.gradient_accumulation_steps, world, tokens_per_step // cfg.train.seq_len,
                 cfg.train.seq_len)
    # ppl@L every eval.every steps and at the last step, to the trainer's loggers
    ppl = evaluate.training_callback(cfg, tokenizer) if cfg.eval.lengths else None
    callbacks = [CheckpointExtras(cfg), Throughput(tokens_per_step), Preemption()] + ([ppl] if ppl else [])
    trainer = LongctxTrainer(
        model=model, args=args, train_dataset=train_ds,
        data_collator=data_lib.DataCollator(tokenizer.pad_token_id), callbacks=callbacks,
        chunked_loss=cfg.train.chunked_loss, loss_chunk_size=cfg.train.loss_chunk_size,
    )
    if ppl is not None:
        ppl.trainer = trainer  # it logs through trainer.log
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    preempted = any(isinstance(c, Preemption) and c.requested for c in trainer.callback_handler.callbacks)
    if preempted:
        log.warning("preempted: checkpoint saved in %s; rerun the same command to resume", run_dir)
        return run_dir
    final = save_final(cfg, trainer, handle, tokenizer)
    return final


def _dataset(cfg: Config, tokenizer, split: str):
    d = cfg.data
    if d.format == "sft":
        return data_lib.build_sft_dataset(d.train, tokenizer, cfg.train.seq_len, prompt_template=d.prompt_template,
                                          split=split, num_proc=d.num_proc)
    return data_lib.build_pretrain_dataset(d.train, tokenizer, cfg.train.seq_len, split=split,
                                           text_field=d.text_field, hub_config=d.hub_config, hub_split=d.hub_split,
                                           min_doc_tokens=d.min_doc_tokens, document_aware=d.document_aware,
                                           num_proc=d.num_proc)


def save_final(cfg: Config, trainer: Trainer, handle, tokenizer) -> Path:
    """RUN/final: adapter (or full weights) with the embed/norm weights as PEFT's modules_to_save, tokenizer and
    longctx.json (with the base config values that plain PEFT needs: rope_parameters, max_position_embeddings)."""
    final = Path(cfg.train.output_dir) / "final"
    trainer.save_model(str(final))
    state_dict = trainable_state(trainer.model) if cfg.lora.enabled else {}
    if is_main_process():
        if state_dict and not model_lib.add_modules_to_save(final, trainer.model, state_dict):
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(final / TRAINABLE))  # longctx loads it
        tokenizer.save_pretrained(str(final))
        info = {"base_model": cfg.model.name_or_path, "gguf_file": cfg.model.gguf_file,
                "train_seq_len": cfg.train.seq_len, "target_length": cfg.target_length, "lora": cfg.lora.enabled,
                **handle.longctx_json(),
                "max_position_embeddings": trainer.model.config.max_position_embeddings,
                "steps": trainer.state.global_step, "config": cfg.model_dump(mode="json")}
        (final / "longctx.json").write_text(json.dumps(info, indent=1))
        log.info("final model in %s", final)
    _barrier()
    return final
