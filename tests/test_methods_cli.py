"""The methods through the command line and sweeps: `longctx generate` (streamed, the same tokens as transformers'
greedy generate), `longctx eval ppl|passkey --method`, a sweep in mode eval with methods as grid values, and bad
input that exits 2 with one message naming the method and what is allowed."""

import json

import pytest
import torch
import yaml

from longctx import sweep as sweep_lib
from longctx.cli import main
from longctx.model import load_model, load_tokenizer


def run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_transformers_greedy_tokens(micro, capsys):
    rc, out, err = run(capsys, "generate", "--model", micro, "--prompt", "def f(x):", "--max-new-tokens", 8)
    assert rc == 0, err
    tok, model = load_tokenizer(str(micro)), load_model(str(micro))
    ids = tok("def f(x):", return_tensors="pt").input_ids
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    assert out.rstrip("\n") == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert "generate:" in err and "8/8" in err and "[generate] 8 tokens" in err


@pytest.mark.parametrize("method", [["rerope", "window=8"], ["consistent_dynamic", "factor=2"], ["logn"],
                                    ["nbce", "chunk=16", "pool=mean"]])
def test_generate_with_each_rope_method(micro, tmp_path, capsys, method):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os\n" * 12 + "def main():\n")
    rc, out, err = run(capsys, "generate", "--model", micro, "--prompt-file", prompt, "--max-new-tokens", 4,
                       "--method", *method)
    assert rc == 0, err
    (line,) = [x for x in err.splitlines() if x.startswith("[generate]") and "prompt" in x]
    assert method[0] in line  # the label names the method


def test_eval_ppl_and_passkey_with_methods(micro, corpus, tmp_path, capsys):
    rc, out, err = run(capsys, "eval", "ppl", "--model", micro, "--lengths", "32,128", "--data", corpus, "--split",
                       "train", "--max-tokens", 200, "--method", "leaky_rerope", "window=8", "leak=4",
                       "--out", tmp_path / "ppl")
    assert rc == 0, err
    (label,) = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert label.endswith("leaky_rerope window=8 leak=4.0")
    rc, out, err = run(capsys, "eval", "passkey", "--model", micro, "--lengths", "256", "--depths", "0.5",
                       "--trials", 1, "--method", "nbce", "chunk=32", "--out", tmp_path / "pk")
    assert rc == 0, err
    label = json.loads((tmp_path / "pk" / "passkey.json").read_text())["model"]
    assert label.endswith("nbce beta=0.25 chunk=32 pool=min_entropy")


BAD = [
    (["--method", "rerop"], "--method rerop: name: unknown method 'rerop'; valid methods: consistent_dynamic, "
                            "rerope, leaky_rerope, logn, nbce, ntk_alibi, dynamic_ntk_alibi"),
    (["--method", "rerope", "leak=4"], "--method rerope: leak: not a parameter of method 'rerope'; method 'rerope' "
                                       "takes: window"),
    (["--method", "nbce", "pool=max"], "--method nbce: pool: Input should be 'min_entropy' or 'mean', got 'max'"),
    (["--method", "rerope", "window"], "--method rerope: expected key=value after the method name, got 'window'"),
    (["--method", "ntk_alibi", "alpha=2"], "method 'ntk_alibi' does not fit model type 'llama' (RoPE); methods for "
                                           "RoPE models: consistent_dynamic, rerope, leaky_rerope, logn, nbce"),
    (["--method", "consistent_dynamic", "--rope", "rope_type=yarn", "factor=2"],
     "method consistent_dynamic computes the rotation itself"),
    (["--rope", "rope_type=yarnn"], "--rope rope_type: unknown type 'yarnn'; valid types: none, linear"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_method_input_exits_2_with_one_message(micro, tmp_path, capsys, args, message):
    for command in (["eval", "ppl", "--model", micro, "--lengths", "32", "--out", tmp_path],
                    ["generate", "--model", micro, "--prompt", "x"]):
        rc, out, err = run(capsys, *command, *args)
        assert rc == 2 and message in err, err
        errors = [line for line in err.splitlines() if "error:" in line]  # (model loading may show progress bars)
        assert len(errors) == 1 and errors[0].split("error: ", 1)[1].startswith(message.split(":")[0])
        assert "Traceback" not in err and err.rstrip().endswith(errors[0].split("error: ", 1)[1])


@pytest.mark.slow  # two `longctx eval` processes: about a minute on 2 CPU cores
def test_sweep_takes_methods_as_grid_values(micro, corpus, tmp_path, capsys):
    """mode: eval with methods in the grid: each run evaluates the base with `--method NAME key=value`; in mode
    train the same grid is refused before anything runs (methods are training-free, except logn)."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"name_or_path": str(micro)}, "data": {"train": str(corpus),
                                                                                   "eval": str(corpus)},
                                    "train": {"seq_len": 128}, "eval": {"lengths": [64, 128], "max_tokens": 200}}))
    grid = {"method": [{"name": "rerope", "window": 16}, {"name": "consistent_dynamic", "factor": 2}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": str(tmp_path / "out"), "mode": "eval",
                                    "grid": grid}))
    sweep = sweep_lib.load_sweep(path)
    assert [sweep_lib.eval_args(r)[-3:] for r in sweep.runs] == [["--method", "rerope", "window=16"],
                                                                  ["--method", "consistent_dynamic", "factor=2.0"]]
    rc, out, err = run(capsys, "sweep", path, "--executor", "debug")
    assert rc == 0, err
    board = (tmp_path / "out" / "leaderboard.csv").read_text()
    assert board.count(",done,") == 2
    for r in sweep.runs:
        assert f"\n{r.name}," in board
        (label,) = json.loads((r.dir / "eval" / "ppl.json").read_text())
        assert r.config.method.name in label
    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": str(tmp_path / "out2"), "grid": grid}))
    rc, out, err = run(capsys, "sweep", path, "--dry-run")
    assert rc == 2 and "method.name: rerope is training-free" in err and "consistent_dynamic is training-free" in err
