"""Bad inputs exit 2 with one message naming the key or file, in train, eval, export and plan alike (issue 18
items 11 and 13); a run's final/ evaluates and exports from any working directory (item 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import GPT2Config

from longctx import evaluate
from longctx.cli import main
from longctx.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def gguf_path() -> Path | None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "get_smollm2.sh")], capture_output=True, text=True,
                          cwd=ROOT)
    path = Path(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None
    return path if path and path.is_file() else None


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, micro):
    """name -> a model source that must be refused, with the words the message must contain."""
    d = tmp_path_factory.mktemp("bad")
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "notes.txt").write_text("hello")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d / "gpt2")  # a family longctx does not patch
    models = {
        "missing": (str(d / "missing"), "does not exist"),
        "not a model": (str(d / "not_a_model"), "directory without config.json"),
        "unsupported family": (str(d / "gpt2"), "model type 'gpt2' is not supported by longctx"),
    }
    gguf = gguf_path()
    if gguf is not None:
        (d / "truncated.gguf").write_bytes(gguf.read_bytes()[:3_000_000])
        models["truncated gguf"] = (str(d / "truncated.gguf"), "could not read the GGUF file truncated.gguf")
    return d, models


def run_cli(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit 2
        code = e.code
    return code, capsys.readouterr().err


def config_for(tmp: Path, train_config, model: str) -> Path:
    cfg = train_config(tmp / "run", model={"name_or_path": model}, train={"max_steps": 2})
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("command", ["train", "plan", "eval", "export"])
@pytest.mark.parametrize("kind", ["missing", "not a model", "unsupported family",
                                  pytest.param("truncated gguf", marks=pytest.mark.slow)])  # reads the SmolLM2 GGUF
def test_a_bad_model_exits_2_with_one_message(bad_models, train_config, tmp_path, capsys, command, kind):
    d, models = bad_models
    if kind not in models:
        pytest.skip("the SmolLM2 GGUF is not installed (bash scripts/get_smollm2.sh)")
    model, words = models[kind]
    if command in ("train", "plan"):
        # lora.target_modules that gpt2 lacks too: the family must be named first, not the LoRA target
        argv = [command, config_for(tmp_path, train_config, model), "lora.target_modules=[q_proj]"]
    elif command == "eval":
        argv = ["eval", "ppl", "--model", model, "--lengths", "64", "--out", tmp_path / "o", "--rope",
                "rope_type=linear", "factor=2"]
    else:  # a run's final/ whose base model is the bad one
        final = tmp_path / "final"
        final.mkdir()
        (final / "longctx.json").write_text(json.dumps({"base_model": model, "lora": True, "train_seq_len": 128}))
        argv = ["export", final, "--out", tmp_path / "o"]
    code, err = run_cli(capsys, argv)
    assert code == 2 and words in err and "Traceback" not in err, err
    assert err.count("error:") == 1 and "lora:" not in err
    assert not (tmp_path / "run").exists()  # train refused it before writing anything


def test_output_dir_that_is_a_file_or_cannot_be_made(micro, train_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = config_for(tmp_path, train_config, str(micro))
    code, err = run_cli(capsys, ["train", config, f"train.output_dir={tmp_path / 'afile'}"])
    assert code == 2 and f"train.output_dir: {tmp_path / 'afile'} exists and is not a directory" in err
    code, err = run_cli(capsys, ["train", config, f"train.output_dir={tmp_path / 'afile' / 'run'}"])
    assert code == 2 and f"train.output_dir: cannot write to {tmp_path / 'afile' / 'run'}" in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--batch-size", "0", "--out", "{tmp}/o"],
     "argument --batch-size: must be >= 1, got 0"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--stride", "-3", "--out", "{tmp}/o"],
     "argument --stride: must be >= 1, got -3"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--max-tokens", "nan", "--out", "{tmp}/o"],
     "argument --max-tokens: expected an integer, got 'nan'"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64,1000000000000", "--out", "{tmp}/o"],
     "argument --lengths: lengths must be integers in [2, 16777216]"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--add", "{tmp}/missing.json", "--out", "{tmp}/o"],
     "--add: cannot read {tmp}/missing.json"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--add", "{tmp}/c.yaml", "--out", "{tmp}/o"],
     "--add: {tmp}/c.yaml is not JSON"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "64", "--out", "{tmp}/c.yaml"],
     "--out: {tmp}/c.yaml exists and is not a directory"),
    (["plan", "{tmp}/c.yaml", "--world-size", "0"], "argument --world-size: must be >= 1, got 0"),
    (["plan", "{tmp}/c.yaml", "--budget-gb", "inf"], "argument --budget-gb: must be > 0, got inf"),
    (["export", "{tmp}/final", "--out", "{tmp}/c.yaml"], "--out: {tmp}/c.yaml exists and is not a directory"),
    (["export", "{tmp}/final", "--out", "{tmp}/o", "--atol", "nan"], "argument --atol: must be >= 0, got nan"),
])
def test_bad_arguments_exit_2_before_any_model_loads(micro, train_config, tmp_path, capsys, monkeypatch, argv, message):
    config_for(tmp_path, train_config, str(micro))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "longctx.json").write_text(json.dumps({"base_model": str(micro), "lora": True,
                                                                  "train_seq_len": 128}))
    loaded = []
    monkeypatch.setattr(evaluate, "load_for_eval", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    code, err = run_cli(capsys, [a.format(micro=micro, tmp=tmp_path) for a in argv])
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert not loaded


# ---------------------------------------------------------------------------------------------------------------
# Item 12: final/ from another working directory

@pytest.fixture(scope="module")
def relative_run(micro, train_config, tmp_path_factory):
    """A run trained from its own directory with relative paths: model.name_or_path=base, output_dir=runs/r."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(micro, work / "base")
    cfg = train_config("runs/r", model={"name_or_path": "base"}, train={"max_steps": 1, "save_steps": 1})
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "c.yaml"], capture_output=True, text=True,
                          cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "r" / "final"


@pytest.mark.slow  # trains a run with train.py in a subprocess: the end-to-end layer
def test_final_records_the_base_model_absolute_and_evaluates_from_elsewhere(relative_run, corpus, tmp_path,
                                                                            monkeypatch, capsys):
    info = json.loads((relative_run / "longctx.json").read_text())
    assert info["base_model"] == str(relative_run.parents[2] / "base")  # absolute, though the config said "base"
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    code, err = run_cli(capsys, ["eval", "ppl", "--model", relative_run, "--lengths", "64", "--max-tokens", "100",
                                 "--data", corpus, "--split", "train", "--out", "o"])
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "ppl.json").read_text())["r/final"][0]["ppl"] > 1


@pytest.mark.slow  # trains a run with train.py in a subprocess: the end-to-end layer
@pytest.mark.parametrize("recorded", ["cwd", "output_dir", "nothing"])
def test_an_older_run_with_a_relative_base_model_path(relative_run, tmp_path, monkeypatch, recorded):
    """Runs written before the path was recorded absolute: the training directory is found from longctx.json's cwd,
    else from the relative train.output_dir; otherwise one message says what was tried."""
    final = tmp_path / "work" / "runs" / "r" / "final"
    shutil.copytree(relative_run.parents[2], tmp_path / "work", ignore=shutil.ignore_patterns("*.lock"))
    info = json.loads((final / "longctx.json").read_text())
    info["base_model"] = "base"
    if recorded != "cwd":
        del info["cwd"]
    if recorded == "nothing":
        info["config"]["train"]["output_dir"] = "elsewhere/r"
    elif recorded == "cwd":
        info["cwd"] = str(tmp_path / "work")  # where the copy of the training directory is
    monkeypatch.chdir(tmp_path)
    if recorded == "nothing":
        with pytest.raises(ConfigError, match="the base model 'base' is a path relative to where training ran"):
            evaluate.base_model_path(final, info)
    else:
        assert evaluate.base_model_path(final, info) == str(tmp_path / "work" / "base")
