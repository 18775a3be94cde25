"""longctx.evaluate: perplexity against hand-computed values, striding, passkey prompts and scoring, plots, CLI errors.

Everything runs in-process on a micro model (tests/micro.py) in seconds; the passkey scorer is checked with a
scripted stand-in model that does or does not find the key.
"""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longctx import evaluate as ev
from longctx.cli import main
from longctx.config import ConfigError, load_config
from longctx.model import load_model, load_tokenizer
from micro import make_micro_base

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_base(tmp_path_factory.mktemp("micro") / "base")


@pytest.fixture(scope="module")
def tokenizer(micro):
    return load_tokenizer(str(micro))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "fnmatch.py"):
        (d / (name + ".txt")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return d


# ---------------------------------------------------------------------------------------------------------------
# Perplexity

@pytest.mark.parametrize("n,length,stride,expected", [
    (10, 4, 4, [(0, 3), (4, 3)]),                        # non-overlapping; the last 2 tokens fit no window
    (10, 4, 2, [(0, 3), (2, 2), (4, 2), (6, 2)]),        # each later window scores its last `stride` tokens
    (6, 4, 1, [(0, 3), (1, 1), (2, 1)]),
    (9, 4, 7, [(0, 3)]),                                 # stride > L - 1: later windows score L - 1
    (12, 4, 8, [(0, 3), (8, 3)]),
    (3, 4, 4, []),
])
def test_window_targets_by_hand(n, length, stride, expected):
    assert ev.window_targets(n, length, stride) == expected


def test_windows_score_every_token_once_when_stride_fits():
    # stride <= L-1: the scored targets are exactly tokens 1 .. end of the last window, each once
    for n, L, S in ((100, 16, 16 - 1), (100, 16, 5), (57, 8, 3), (64, 64, 64 - 1)):
        targets = []
        windows = ev.window_targets(n, L, S)
        for start, k in windows:
            targets += range(start + L - k, start + L)
        assert targets == list(range(1, windows[-1][0] + L))


class Uniform(torch.nn.Module):
    """Logits all zero over V tokens: every prediction has probability 1/V, so PPL = V exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + 0 * self.w)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    tokens = torch.arange(50) % 7
    r = ev.perplexity(Uniform(37), tokens, length=8, stride=3)
    assert r["ppl"] == pytest.approx(37.0, rel=1e-6) and r["nll"] == pytest.approx(math.log(37), rel=1e-6)
    assert r["windows"] == 15 and r["tokens"] == 7 + 14 * 3  # starts 0, 3, ..., 42


def test_perplexity_matches_hand_computed_two_windows(micro):
    model = load_model(str(micro)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    # L = 8, S = 4: window [0, 8) scores targets 1..7; window [4, 12) scores its last 4 targets 8..11
    with torch.no_grad():
        lp0 = torch.log_softmax(model(tokens[None, 0:8]).logits[0].double(), -1)
        lp1 = torch.log_softmax(model(tokens[None, 4:12]).logits[0].double(), -1)
    nll = -(sum(lp0[i - 1, tokens[i]] for i in range(1, 8)) + sum(lp1[i - 4 - 1, tokens[i]] for i in range(8, 12)))
    expected = math.exp(nll.item() / 11)
    r = ev.perplexity(model, tokens, length=8, stride=4)
    assert r["tokens"] == 11 and r["windows"] == 2
    assert r["ppl"] == pytest.approx(expected, rel=1e-5)
    # the budget keeps whole windows until it is reached: 7 scored tokens >= 5 -> the first window only
    first = ev.perplexity(model, tokens, length=8, stride=4, max_tokens=5)
    assert first["tokens"] == 7 and first["ppl"] == pytest.approx(math.exp(-lp0[range(7), tokens[1:8]].mean().item()),
                                                                  rel=1e-5)


def test_perplexity_refuses_data_shorter_than_a_window():
    with pytest.raises(ConfigError, match="fewer than one window of 64"):
        ev.perplexity(Uniform(5), torch.zeros(63, dtype=torch.long), length=64)


def test_eval_ppl_cli_writes_json_table_and_png(micro, corpus, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "ppl", "--model", str(micro), "--lengths", "32,64", "--data", str(corpus),
                 "--max-tokens", "200", "--out", str(out)]) == 0
    results = json.loads((out / "ppl.json").read_text())
    (rows,) = results.values()
    assert [r["length"] for r in rows] == [32, 64] and all(r["tokens"] >= 200 for r in rows)
    assert (out / "ppl.png").read_bytes()[:8] == PNG
    assert (out / "ppl.md").read_text().startswith("| model | PPL@32 | PPL@64 |")


def test_eval_ppl_reads_code_files_with_suffixes(micro, tmp_path, capsys):
    """A directory of .py files is refused by default (one message naming the allowed types) and read with
    --suffixes .py, giving the same tokens as the same texts saved as .txt."""
    import sysconfig

    code, txt = tmp_path / "code", tmp_path / "txt"
    code.mkdir(), txt.mkdir()
    for name in ("textwrap.py", "bisect.py"):
        text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text()
        (code / name).write_text(text)
        (txt / (name + ".txt")).write_text(text)
    argv = ["eval", "ppl", "--model", str(micro), "--lengths", "64", "--max-tokens", "300"]
    assert main(argv + ["--data", str(code), "--out", str(tmp_path / "a")]) == 2
    assert "has no .txt/.jsonl/.json/.parquet files" in capsys.readouterr().err
    assert main(argv + ["--data", str(code), "--suffixes", ".py", "--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--data", str(txt), "--out", str(tmp_path / "b")]) == 0
    a, b = (list(json.loads((tmp_path / d / "ppl.json").read_text()).values())[0] for d in "ab")
    assert a == b


# ---------------------------------------------------------------------------------------------------------------
# Passkey: prompts

def _sentence_tokens(tokenizer) -> int:
    """The most tokens one filler sentence (with its separating space) can add."""
    return max(len(tokenizer(" " + s, add_special_tokens=False).input_ids) for s in ev.PASSKEY_FILLER)


@pytest.mark.parametrize("length", [256, 600, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(tokenizer, length, depth):
    p = ev.passkey_prompt(tokenizer, length, depth, "40312")
    ids = tokenizer(p["text"]).input_ids
    assert p["input_ids"] == ids and p["tokens"] == len(ids)
    # never longer than the target, and short of it by less than one more filler sentence
    assert length - _sentence_tokens(tokenizer) - 1 < p["tokens"] <= length
    lines = p["text"].split("\n")
    assert lines[0] == ev.PASSKEY_TASK and lines[-1] == ev.PASSKEY_QUESTION
    key_line = lines.index("The pass key is 40312. Remember it. 40312 is the pass key.")
    sentences = [s for line in lines[1:-1] if line != lines[key_line] for s in re.findall(r"[^.]+\.", line)]
    assert len(sentences) == p["filler"] and p["text"].count("40312") == 2
    before = sum(len(re.findall(r"[^.]+\.", line)) for line in lines[1:key_line])
    assert before == round(depth * p["filler"]) == p["key_sentence"]  # the key after round(depth * n) sentences
    assert tokenizer.decode(p["input_ids"][p["key_start"]:]).startswith("The pass key is 40312.")
    if depth == 0.0:
        assert key_line == 1
    if depth == 1.0:
        assert key_line == len(lines) - 2
    # the depth in tokens: within one sentence of the target
    task = len(tokenizer(ev.PASSKEY_TASK + "\n").input_ids)
    key = len(tokenizer(lines[key_line]).input_ids)
    filler_tokens = p["tokens"] - task - key - len(tokenizer(ev.PASSKEY_QUESTION).input_ids)
    assert abs((p["key_start"] - task) - depth * filler_tokens) <= _sentence_tokens(tokenizer) + 2


def test_passkey_prompt_is_pure_and_keys_are_seeded(tokenizer):
    assert ev.passkey_prompt(tokenizer, 500, 0.5, "11111") == ev.passkey_prompt(tokenizer, 500, 0.5, "11111")
    keys = [ev.passkey_key(0, 512, 0.5, t) for t in range(20)]
    assert keys == [ev.passkey_key(0, 512, 0.5, t) for t in range(20)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys) and len(set(keys)) > 15
    others = [[ev.passkey_key(*args, t) for t in range(20)] for args in ((1, 512, 0.5), (0, 1024, 0.5), (0, 512, 1.0))]
    assert all(sum(a != b for a, b in zip(keys, other)) > 15 for other in others)  # another seed, length or depth


@pytest.mark.parametrize("length,depth,message", [
    (100, 0.5, "cannot hold the passkey prompt"),
    (500, 1.5, "must be in \\[0, 1\\]"),
    (500, -0.1, "must be in \\[0, 1\\]"),
])
def test_passkey_prompt_bad_input(tokenizer, length, depth, message):
    with pytest.raises(ConfigError, match=message):
        ev.passkey_prompt(tokenizer, length, depth, "12345")


# ---------------------------------------------------------------------------------------------------------------
# Passkey: scoring with a scripted stand-in model

@pytest.mark.parametrize("text,ok", [
    (" 12345.", True), ("12345", True), (" 12345. Remember it.", True), (" is 12345 and 6", True),
    (" 123456", False), (" 1234", False), (" 54321 12345", False), (" no digits", False), ("", False),
])
def test_passkey_correct(text, ok):
    assert ev.passkey_correct(text, "12345") is ok


class Scripted:
    """A generate-only stand-in: reads the key out of the prompt and answers it (or a wrong one), greedily."""

    def __init__(self, tokenizer, finds=lambda prompt: True):
        self.tokenizer, self.finds, self.calls = tokenizer, finds, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, do_sample=True, **kw):
        assert not do_sample and attention_mask.shape == input_ids.shape
        prompt = self.tokenizer.decode(input_ids[0])
        key = re.search(r"The pass key is (\d{5})\.", prompt).group(1)
        self.calls.append((input_ids.shape[1], max_new_tokens, key))
        answer = key if self.finds(prompt) else str(99999 - int(key))
        new = self.tokenizer(f" {answer}. Remember it.", add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def _grid(result) -> dict:
    return {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}


def test_passkey_scoring_with_scripted_models(tokenizer, tmp_path):
    lengths, depths = [256, 400], [0.0, 0.5, 1.0]
    finder = Scripted(tokenizer)
    r = ev.passkey(finder, tokenizer, lengths, depths, trials=3, seed=1)
    assert _grid(r) == {(L, d): 1.0 for L in lengths for d in depths}
    assert len(finder.calls) == 18 and all(n <= L for (n, _, _), L in zip(finder.calls, [256] * 9 + [400] * 9))
    assert all(m >= len(tokenizer(" " + k, add_special_tokens=False).input_ids) for _, m, k in finder.calls)
    assert [k for *_, k in finder.calls[:3]] == [ev.passkey_key(1, 256, 0.0, t) for t in range(3)]

    wrong = ev.passkey(Scripted(tokenizer, finds=lambda p: False), tokenizer, lengths, depths, trials=3, seed=1)
    assert _grid(wrong) == {(L, d): 0.0 for L in lengths for d in depths}

    # finds the key only when it sits in the first half of the prompt
    def early(prompt):
        return prompt.index("The pass key is") < len(prompt) / 2

    half = ev.passkey(Scripted(tokenizer, finds=early), tokenizer, lengths, depths, trials=2, seed=1)
    assert _grid(half) == {(L, d): (1.0 if d < 0.5 else 0.0) for L in lengths for d in depths}

    ev.write_passkey({"model": "half", **half}, tmp_path)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["accuracy"] == {"256": {"0.0": 1.0, "0.5": 0.0, "1.0": 0.0}, "400": {"0.0": 1.0, "0.5": 0.0,
                                                                                      "1.0": 0.0}}
    assert saved["accuracy_by_length"] == {"256": pytest.approx(1 / 3), "400": pytest.approx(1 / 3)}
    assert (tmp_path / "passkey.png").read_bytes()[:8] == PNG


def test_eval_passkey_cli_on_a_real_model(micro, tmp_path):
    out = tmp_path / "pk"
    assert main(["eval", "passkey", "--model", str(micro), "--lengths", "256", "--depths", "0,1", "--trials", "1",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "passkey.json").read_text())
    assert saved["lengths"] == [256] and saved["depths"] == [0.0, 1.0] and len(saved["cells"]) == 2
    assert all(c["trials"] == 1 and c["mean_tokens"] <= 256 for c in saved["cells"])
    assert (out / "passkey.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------------------------------
# During training: the callback's schedule, eval mode, logging

class FakeTrainer:
    def __init__(self):
        self.logs = []
        self.control = SimpleNamespace(should_log=True)

    def log(self, logs):
        self.logs.append(dict(logs))
        self.control.should_log = False  # as Trainer.log does (its on_log)


@pytest.mark.parametrize("every,steps", [(None, [5]), (2, [2, 4, 5])])
def test_training_callback_schedule_and_train_mode(micro, corpus, tokenizer, every, steps):
    cfg = load_config(data={"model": {"name_or_path": str(micro)}, "data": {"train": str(corpus)},
                            "train": {"seq_len": 64}, "eval": {"lengths": [32, 64]}})
    trainer = FakeTrainer()
    cb = ev.training_callback(lambda: ev.run_eval_tokens(cfg, tokenizer), [32, 64], trainer.log, every=every,
                              max_tokens=100)
    model = load_model(str(micro)).train()
    cb.on_train_begin(None, None, None)
    logged = []
    for step in range(1, 6):
        n = len(trainer.logs)
        trainer.control.should_log = True  # logging_steps=1: Trainer logs this step's loss after on_step_end
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=5), trainer.control, model=model)
        assert model.training  # restored after evaluating in eval mode
        assert trainer.control.should_log  # logging ppl did not cancel the loss log of the step
        logged += [step] if len(trainer.logs) > n else []
    assert logged == steps
    expected = ev.perplexity(model, cb.tokens, 64, max_tokens=100)["ppl"]
    assert set(trainer.logs[-1]) == {"ppl@32", "ppl@64"} and trainer.logs[-1]["ppl@64"] == expected


def test_training_callback_refuses_data_shorter_than_a_window(micro, corpus, tokenizer):
    cfg = load_config(data={"model": {"name_or_path": str(micro)}, "data": {"train": str(corpus)},
                            "train": {"seq_len": 64}, "eval": {"lengths": [10**6]}})
    with pytest.raises(Exception, match="fewer than one"):
        ev.training_callback(lambda: ev.run_eval_tokens(cfg, tokenizer), [10**6], print).on_train_begin(
            None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit 2 with one readable message

@pytest.mark.parametrize("argv,message", [
    (["eval", "ppl", "--model", "{tmp}/missing", "--lengths", "64", "--out", "{tmp}/o"], "does not exist"),
    (["eval", "ppl", "--model", "runs/nothing/final", "--lengths", "64", "--out", "{tmp}/o"], "does not exist"),
    (["eval", "ppl", "--model", "{tmp}", "--lengths", "64", "--out", "{tmp}/o"], "without config.json"),
    (["eval", "ppl", "--model", "{micro}", "--lengths", "100000", "--data", "{corpus}", "--out", "{tmp}/o"],
     "fewer than one block of seq_len=100000"),
    (["eval", "passkey", "--model", "{micro}", "--lengths", "512", "--depths", "0,1.5", "--out", "{tmp}/o"],
     "--depths: every depth must be in [0, 1]"),
    (["eval", "passkey", "--model", "{micro}", "--lengths", "64", "--out", "{tmp}/o"],
     "cannot hold the passkey prompt"),
])
def test_bad_input_exits_2(micro, corpus, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, micro=micro, corpus=corpus) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--lengths", "0"), ("--lengths", "-256"), ("--lengths", "a,b"),
                                        ("--lengths", "99999999999"), ("--depths", "x"), ("--trials", "0"),
                                        ("--seed", "-1")])
def test_bad_arguments_exit_2(micro, tmp_path, capsys, flag, value):
    argv = ["eval", "passkey", "--model", str(micro), "--out", str(tmp_path), "--lengths", "256", flag, value]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_a_full_fine_tuning_run_evaluates_with_its_own_scaling(train_config, tmp_path):
    """final/ of a full fine-tuning holds config.json with the run's yarn: load_for_eval must not apply it again
    (composing yarn x2 on the saved yarn x2 was refused), and the model it gives computes what the trained one did."""
    import torch

    from longctx.config import load_config
    from longctx.evaluate import load_for_eval
    from longctx.model import load_model
    from longctx.trainer import train

    cfg = load_config(data=train_config(tmp_path / "run", lora={"enabled": False}, train={"max_steps": 1,
                                                                                         "save_steps": 1}))
    final = train(cfg)
    model, _, _ = load_for_eval(str(final))
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 2.0
    plain = load_model(str(final), dtype="float32").eval()  # transformers alone reads the scaling from config.json
    ids = torch.randint(0, plain.config.vocab_size, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)
