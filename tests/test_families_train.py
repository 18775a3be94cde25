"""Every family in longctx.families.FAMILIES end to end on a micro base of that family: `longctx train` runs 3
LoRA + embed/norm steps (S² where the family supports it, else full attention) with scaled RoPE, then
`longctx export` merges the run and verifies it with plain transformers in a fresh process (export.py).

Both commands run in this process (`longctx.cli.main`, what train.py calls) to spare an interpreter start per
family; the signal handlers the trainer installs for preemption are put back afterwards. test_train.py covers
train.py as a subprocess."""

from __future__ import annotations

import json
import math
import signal

import pytest
import yaml

from longctx.cli import main
from longctx.families import FAMILIES
from micro import make_micro_base

# Gemma-3's micro base ships linear x2 on its global layers, as Gemma-3 4B+ ships linear x8: the run composes on it.
GEMMA3_NATIVE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
BASE_EXTRA = {"gemma3_text": {"rope_parameters": GEMMA3_NATIVE}}
ROPE = {"gemma3_text": {"rope_type": "linear"}}  # the native scheme; factor 128 / 32 = 4 (x2 on top of x2)
# What the exported config.json must carry (the scaled dict; Gemma-3: per layer type, sliding layers untouched).
EXPECTED = {"gemma3_text": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6,
                                               "original_max_position_embeddings": 32},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


def expected_rope(family: str) -> dict:
    if family in EXPECTED:
        return EXPECTED[family]
    if family == "phi3":  # its config takes only longrope: yarn's numbers as a longrope dict (test_families.py)
        return {"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 1e4,
                "partial_rotary_factor": 0.75, "attention_factor": 0.1 * math.log(2.0) + 1}
    return {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
            "rope_theta": 2e6 if family == "smollm3" else 1e4}


def without_factor_lists(rp: dict) -> dict:
    return {k: v for k, v in rp.items() if k not in ("short_factor", "long_factor")}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_three_training_steps_then_export_round_trip(family, tmp_path, train_config):
    base = make_micro_base(tmp_path / "base", family=family, **BASE_EXTRA.get(family, {}))
    s2 = FAMILIES[family].s2_refused is None
    cfg = train_config(tmp_path / "run", model={"name_or_path": str(base)},
                       rope=ROPE.get(family, {"rope_type": "yarn"}),
                       attention={"type": "s2" if s2 else "full", "group_size_ratio": 0.25},
                       train={"gradient_checkpointing": True})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert main(["train", str(tmp_path / "c.yaml")]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    info = json.loads((tmp_path / "run" / "final" / "longctx.json").read_text())
    assert without_factor_lists(info["rope_parameters"]) == expected_rope(family)

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run" / "final"), "--out", str(out)]) == 0  # verifies, fresh process
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == info["rope_parameters"] and config["max_position_embeddings"] == 128
    assert "Verified at export" in (out / "README.md").read_text()
