"""A trained micro run: ppl@L logged during training, then `longctx export` and plain transformers round trips.

One LoRA run (3 steps, yarn x2 from 64 to 128 tokens, S2, ppl every 2 steps and at the end) is trained with
`python train.py` and shared by the tests of this file; a 1-step QLoRA run checks the merge into the unquantized
base.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from longctx import export as export_lib
from longctx.cli import main
from longctx.evaluate import load_for_eval

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def train_run(tmp: Path, micro: Path, corpus: Path, *overrides: str) -> Path:
    cfg = {
        "model": {"name_or_path": str(micro)},
        "rope": {"rope_type": "yarn", "factor": 2.0},
        "attention": {"type": "s2", "group_size_ratio": 0.25},
        "data": {"train": str(corpus), "num_proc": 1},
        "train": {"output_dir": str(tmp / "run"), "seq_len": 128, "max_steps": 3, "learning_rate": 3e-3,
                  "warmup_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 3,
                  "gradient_checkpointing": False, "seed": 7},
        "eval": {"lengths": [64, 128], "every": 2, "max_tokens": 300},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(path), *overrides], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro, corpus):
    return train_run(tmp_path_factory.mktemp("lora"), micro, corpus)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(run / "final"), "--out", str(out)]) == 0  # verifies in a fresh process itself
    return out


def fixed_input(n: int = 128, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(11))


def test_training_logs_ppl_every_n_steps_and_at_the_end(run):
    history = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    ppl = {e["step"]: e for e in history if "ppl@64" in e}
    assert sorted(ppl) == [2, 3] and all("ppl@128" in e for e in ppl.values())  # every 2 steps, and the last
    # the last in-training value is the dense eval-mode PPL of the final model, as eval_run computes it from final/
    final = json.loads((run / "eval" / "ppl.json").read_text())
    for r in final["extended"]:
        assert ppl[3][f"ppl@{r['length']}"] == pytest.approx(r["ppl"], rel=1e-4)
    assert (run / "eval" / "ppl.png").read_bytes()[:8] == PNG


def test_export_writes_scaled_config_tokenizer_and_card(run, exported, micro):
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_parameters"] == YARN
    assert config["max_position_embeddings"] == 128
    assert "attn_implementation" not in config and "_attn_implementation" not in config
    assert "longctx" not in json.dumps(config) and "quantization_config" not in config
    assert (exported / "tokenizer.json").is_file()
    card = (exported / "README.md").read_text()
    for needle in (str(micro), "yarn x2", "128 tokens", "LoRA r8", "| extended |", "Verified at export"):
        assert needle in card, needle
    assert not (exported / "longctx.json").exists() and not (exported / "adapter_config.json").exists()


def test_plain_transformers_reproduces_the_longctx_model(run, exported, micro):
    ids = fixed_input()  # 128 tokens: twice the original context of 64
    plain = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ours, _, _ = load_for_eval(str(run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(micro)).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (plain, ours, base))
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - c).abs().max().item() > 1e-2  # the training and the scaling changed the model


def test_export_fails_loudly_when_the_config_loses_the_scaling(run, tmp_path, monkeypatch, capsys):
    # A broken export (config.json without the scaling, as LongLoRA's merge wrote it) must not pass the check.
    monkeypatch.setattr(export_lib, "finalize_config", lambda config, trained, original: setattr(
        config, "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}))
    assert main(["export", str(run / "final"), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "differ from the longctx model" in err


@pytest.mark.parametrize("make,message", [
    (lambda tmp, run: [str(tmp / "missing"), "--out", str(tmp / "o")], "does not exist"),
    (lambda tmp, run: [str(run), "--out", str(tmp / "o")], "no longctx.json"),
    (lambda tmp, run: [str(run / "final"), "--out", str(run)], "exists and is not empty"),
])
def test_export_bad_input_exits_2(run, tmp_path, capsys, make, message):
    assert main(["export", *make(tmp_path, run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_qlora_run_merges_into_the_unquantized_base(tmp_path, micro, corpus):
    run = train_run(tmp_path, micro, corpus, "model.quantization=4bit", "lora.target_modules=all-linear",
                    "train.max_steps=1", "eval.lengths=[]")
    out = tmp_path / "hf"
    report = export_lib.export(run / "final", out)
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["rope_parameters"] == YARN
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(p.dtype == torch.float32 for p in plain.parameters())  # merged into float weights, not 4-bit
    assert "QLoRA" in (out / "README.md").read_text()
