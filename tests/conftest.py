"""Shared fixtures: a micro base model, a small real corpus, and training configs on them for end-to-end runs."""

import sysconfig
from pathlib import Path

import pytest

from micro import make_micro_base


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_base(tmp_path_factory.mktemp("micro") / "base")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real documents (stdlib modules) as .txt files: fast to tokenize."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py"):
        (d / (name + ".txt")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def train_config(micro, corpus):
    """A factory of training configs (dicts) for `micro` on `corpus`: yarn x2, S²-Attn with groups of 1/4, three
    steps of 2 x 128 tokens, a checkpoint at the end, seed 7.

        train_config(out)                                   # the defaults, output in `out`
        train_config(out, train={"max_steps": 8})           # `train` updates the default train section
        train_config(out, rope=None, attention={...})       # any other section replaces the default; None drops it
    """

    def make(output_dir, *, train: dict | None = None, **sections) -> dict:
        cfg = {
            "model": {"name_or_path": str(micro)},
            "rope": {"rope_type": "yarn", "factor": 2.0},
            "attention": {"type": "s2", "group_size_ratio": 0.25},
            "data": {"train": str(corpus), "num_proc": 1},
            "train": {"output_dir": str(output_dir), "seq_len": 128, "max_steps": 3, "learning_rate": 3e-3,
                      "warmup_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                      "logging_steps": 1, "save_steps": 3, "gradient_checkpointing": False, "seed": 7,
                      **(train or {})},
        }
        cfg.update(sections)
        return {k: v for k, v in cfg.items() if v is not None}

    return make
