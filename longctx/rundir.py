"""The run directory: every file name and the layout in one place (trainer, evaluate, export, sweep read it here).

    RUN/config.yaml                 the resolved config, every default filled in
    RUN/checkpoint-<step>/          Trainer's checkpoint + trainable_params.safetensors + longctx_config.yaml,
                                    and longctx_complete.json, written last: without it the checkpoint is ignored
    RUN/final/                      adapter (or full weights) + trainable_params.safetensors + tokenizer + longctx.json
    RUN/eval/                       ppl.json|md|png, passkey.json|md|png, ...

Plain pathlib, no torch or transformers: the sweep launcher reads run directories without loading a model.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"  # RUN/config.yaml
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's own naming: checkpoint-<global step>
COMPLETE = "longctx_complete.json"  # in a checkpoint, written last and atomically
CHECKPOINT_CONFIG = "longctx_config.yaml"  # in a checkpoint: the config it was trained with
TRAINABLE = "trainable_params.safetensors"  # the LongLoRA+ embed/norm weights (checkpoint and final/)
FINAL = "final"
INFO = "longctx.json"  # in final/: base model, rope, attention, lengths, the config
EVAL = "eval"

_CHECKPOINT = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint-<step> directory name, None for any other name."""
    m = _CHECKPOINT.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(run: Path) -> list[Path]:
    """Every checkpoint-<step> directory of a run, complete or not, oldest first."""
    found = [p for p in Path(run).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / COMPLETE).is_file()


def complete_checkpoints(run: Path) -> list[Path]:
    """checkpoint-<step> directories that finished saving, oldest first."""
    return [p for p in checkpoints(run) if is_complete(p)]


def final_dir(run: Path) -> Path:
    return Path(run) / FINAL


def eval_dir(run: Path) -> Path:
    return Path(run) / EVAL


def info_path(final: Path) -> Path:
    return Path(final) / INFO
