"""longctx.tasks (RULER multikey, multivalue, vartrack) and longctx.position_loss.

Every prompt is checked by construction, reading its text back as a reader would: the needle the depth places
sits after round(depth x n) filler sentences, distractor keys and values differ, the vartrack chain run as Python
gives exactly the expected names the queried value. The scoring rule against hand examples; the evaluation loop
with a scripted stand-in model that solves (or half solves) each task from the prompt text; the per-position loss
against a plain per-token cross-entropy of a plain transformers model; the CLI end to end on a micro model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from longctx import evaluate as ev
from longctx import position_loss as pl
from longctx import tasks
from longctx.cli import main
from longctx.model import load_tokenizer
from reference import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@pytest.fixture(scope="module")
def tokenizer(micro):
    return load_tokenizer(str(micro))


def read_back(text: str) -> list[tuple[int, str]]:
    """(filler sentences before it, line) for every line that is not filler, between the task and the question."""
    out, filler = [], 0
    for line in text.split("\n")[1:-1]:
        if not line:
            continue
        if line.endswith(".") and all(s.strip() + "." in ev.PASSKEY_FILLER for s in line.split(".")[:-1]):
            filler += len(re.findall(r"[^.]+\.", line))
        else:
            out.append((filler, line))
    return out


def filler_count(text: str) -> int:
    return sum(len(re.findall(r"[^.]+\.", line)) for line in text.split("\n")[1:-1]
               if line and line not in {x for _, x in read_back(text)})


def check_fit(name, tokenizer, p, length, depth, seed, trial):
    """At most `length` tokens, and one more filler sentence would not fit."""
    assert p["tokens"] == len(tokenizer(p["text"]).input_ids) == len(p["input_ids"]) <= length
    assert filler_count(p["text"]) == p["filler"]
    more = tasks.TASKS[name].build(p["filler"] + 1, depth, tasks.trial_rng(name, seed, length, depth, trial))
    assert len(tokenizer(more.text).input_ids) > length


CASES = [(L, d, t) for L in (900, 1600) for d in (0.0, 0.3, 0.5, 1.0) for t in range(2)]


@pytest.mark.parametrize("length,depth,trial", CASES)
def test_multikey_prompt(tokenizer, length, depth, trial):
    p = tasks.task_prompt("multikey", tokenizer, length, depth, seed=0, trial=trial)
    check_fit("multikey", tokenizer, p, length, depth, 0, trial)
    lines = p["text"].split("\n")
    assert lines[0].startswith("A special magic number is hidden within the following text.")
    query = re.fullmatch(r"What is the special magic number for (\S+) mentioned in the provided text\? The special "
                         r"magic number for \1 mentioned in the provided text is", lines[-1]).group(1)
    needles = [(before, NEEDLE.fullmatch(line).groups()) for before, line in read_back(p["text"])]
    assert len(needles) == 4
    keys, values = [k for _, (k, _) in needles], [v for _, (_, v) in needles]
    assert len(set(keys)) == 4 and len(set(values)) == 4  # distractors differ from the query and each other
    (before, (_, value)), = [(b, kv) for b, kv in needles if kv[0] == query]
    assert p["answers"] == [value] and p["text"].count(value) == 1 and re.fullmatch(r"[1-9]\d{6}", value)
    assert before == round(depth * p["filler"])  # exactly where the depth says


@pytest.mark.parametrize("length,depth,trial", CASES)
def test_multivalue_prompt(tokenizer, length, depth, trial):
    p = tasks.task_prompt("multivalue", tokenizer, length, depth, seed=0, trial=trial)
    check_fit("multivalue", tokenizer, p, length, depth, 0, trial)
    query = re.search(r"What are all the special magic numbers for (\S+) mentioned", p["text"]).group(1)
    needles = [(before, NEEDLE.fullmatch(line).groups()) for before, line in read_back(p["text"])]
    assert len(needles) == 4 and all(k == query for _, (k, _) in needles)
    assert sorted(v for _, (_, v) in needles) == sorted(p["answers"]) and len(set(p["answers"])) == 4
    assert all(p["text"].count(v) == 1 for v in p["answers"])
    assert (round(depth * p["filler"]), p["answers"][0]) in [(b, v) for b, (_, v) in needles]


@pytest.mark.parametrize("length,depth,trial", CASES)
def test_vartrack_chain_resolves_when_run_as_python(tokenizer, length, depth, trial):
    p = tasks.task_prompt("vartrack", tokenizer, length, depth, seed=0, trial=trial)
    check_fit("vartrack", tokenizer, p, length, depth, 0, trial)
    value = int(re.search(r"assigned the value (\d+) in the text above", p["text"]).group(1))
    assert f"5 variables are assigned the value {value}, they are:" in p["text"]
    chain = read_back(p["text"])
    assert all(re.fullmatch(r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})", line) for _, line in chain) and len(chain) == 5
    scope: dict = {}
    exec("\n".join(line.replace("VAR ", "") for _, line in chain), {}, scope)  # in text order: NameError if not
    assert sorted(k for k, v in scope.items() if v == value) == sorted(p["answers"]) and len(scope) == 5
    assert chain[0] == (round(depth * p["filler"]), f"VAR {p['answers'][0]} = {value}")


@pytest.mark.parametrize("length,depth,seed,trial", [(300, 0.0, 0, 0), (500, 0.25, 3, 2), (1200, 0.5, 1, 4),
                                                     (2000, 1.0, 7, 1)])
def test_passkey_entry_is_evaluates_passkey_prompt(tokenizer, length, depth, seed, trial):
    p = tasks.task_prompt("passkey", tokenizer, length, depth, seed, trial)
    ref = ev.passkey_prompt(tokenizer, length, depth, ev.passkey_key(seed, length, depth, trial))
    assert (p["text"], p["input_ids"], p["answers"], p["filler"]) == (ref["text"], ref["input_ids"], [ref["key"]],
                                                                     ref["filler"])


def test_prompts_are_seeded(tokenizer):
    a = tasks.task_prompt("multikey", tokenizer, 900, 0.5, seed=0, trial=0)
    assert a == tasks.task_prompt("multikey", tokenizer, 900, 0.5, seed=0, trial=0)
    assert a["answers"] != tasks.task_prompt("multikey", tokenizer, 900, 0.5, seed=1, trial=0)["answers"]


def test_too_short_and_bad_depth(tokenizer):
    with pytest.raises(Exception, match="cannot hold the vartrack prompt"):
        tasks.task_prompt("vartrack", tokenizer, 100, 0.5)
    with pytest.raises(Exception, match="must be in \\[0, 1\\]"):
        tasks.task_prompt("multikey", tokenizer, 900, 1.5)


# ---------------------------------------------------------------------------------------------------------------
# Scoring: RULER's string_match_all, by hand

@pytest.mark.parametrize("prediction,answers,score", [
    (" 1234567.", ["1234567"], 1.0),
    (" 7654321.", ["1234567"], 0.0),
    (" 12345678", ["1234567"], 1.0),                     # a substring counts (RULER's rule)
    (" 111, 222 and more", ["111", "222", "333", "444"], 0.5),
    (" hmued, vzgit,\nabcde", ["HMUED", "VZGIT", "ABCDE"], 1.0),  # case-insensitive, across lines
    (" HMUED", ["HMUED", "VZGIT"], 0.5),
    ("", ["1"], 0.0),
])
def test_string_match_all_by_hand(prediction, answers, score):
    assert tasks.string_match_all(prediction, answers) == score


def test_generation_budgets(tokenizer):
    # passkey: evaluate.passkey's (the key's tokens + 2); RULER's at least (constants.py: niah 128, vt 30); and never
    # fewer than the expected answers written out take (the micro tokenizer needs 35 for 5 vartrack names)
    assert tasks.new_tokens("passkey", tokenizer, ["12345"]) == len(tokenizer(" 12345.").input_ids) + 2
    assert tasks.new_tokens("multikey", tokenizer, ["1234567"]) == 128
    names = ["HMUED", "VZGIT", "DJXTN", "GLHDM", "HLETK"]
    written = len(tokenizer(" HMUED, VZGIT, DJXTN, GLHDM, HLETK.").input_ids)
    assert written > 30 and tasks.new_tokens("vartrack", tokenizer, names) == written + 10


def test_passkey_score_is_evaluates():
    assert tasks.passkey_score(" 12345.", ["12345"]) == 1.0 and tasks.passkey_score(" 123456", ["12345"]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The loop, with a stand-in that solves the task from the prompt text

def solve(text: str) -> list[str]:
    """The answers as a reader finds them in the prompt (not from the builder)."""
    last = text.split("\n")[-1]
    if "VAR " in text:
        value = int(re.search(r"assigned the value (\d+)", last).group(1))
        scope: dict = {}
        exec("\n".join(x.replace("VAR ", "") for x in text.split("\n") if x.startswith("VAR ")), {}, scope)
        return [k for k, v in scope.items() if v == value]
    key = re.search(r"special magic numbers? for (\S+) mentioned", last).group(1)
    return [v for k, v in NEEDLE.findall(text) if k == key]


class Solver:
    """generate-only: answers the first `fraction` of the solution (or a wrong number), greedily."""

    def __init__(self, tokenizer, fraction=1.0):
        self.tokenizer, self.fraction, self.budgets = tokenizer, fraction, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, do_sample=True, **kw):
        assert not do_sample
        found = solve(self.tokenizer.decode(input_ids[0]))
        given = found[:round(self.fraction * len(found))] or ["0"]
        new = self.tokenizer(" " + ", ".join(given) + ".", add_special_tokens=False).input_ids
        self.budgets.append((max_new_tokens, len(new)))
        return torch.cat([input_ids, torch.tensor([new[:max_new_tokens]])], dim=1)


@pytest.mark.parametrize("name,half", [("multikey", 0.0), ("multivalue", 0.5), ("vartrack", 0.4)])
def test_evaluate_task_with_a_scripted_solver(tokenizer, tmp_path, name, half):
    lengths, depths = [900, 1300], [0.0, 1.0]
    solver = Solver(tokenizer)
    r = tasks.evaluate_task(name, solver, tokenizer, lengths, depths, trials=2, seed=1)
    assert [(c["length"], c["depth"], c["accuracy"], c["correct"]) for c in r["cells"]] == \
        [(L, d, 1.0, 2) for L in lengths for d in depths]
    assert all(budget >= used for budget, used in solver.budgets)  # the budget holds the whole right answer
    partial = tasks.evaluate_task(name, Solver(tokenizer, 0.5), tokenizer, lengths, depths, trials=2, seed=1)
    assert all(c["accuracy"] == half and c["correct"] == 0 for c in partial["cells"])
    assert all(a["score"] == half and a["expected"] for c in partial["cells"] for a in c["answers"])
    tasks_json = {"model": "half", **partial}
    ev.write_passkey(tasks_json, tmp_path, name)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["task"] == name and saved["accuracy"] == {str(L): {str(d): half for d in depths} for L in lengths}
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG and (tmp_path / f"{name}.md").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Per-position loss

def test_position_loss_is_the_plain_per_token_cross_entropy():
    model = tiny_model("llama", max_pos=64).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 97, (20,), generator=g) for _ in range(3)]
    expected = torch.zeros(19, dtype=torch.float64)
    with torch.no_grad():
        for ids in docs:
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
            expected += -logp[torch.arange(19), ids[1:]] / 3
    assert torch.allclose(torch.tensor(pl.position_loss(model, docs), dtype=torch.float64), expected, atol=1e-10)


def test_buckets_by_hand():
    assert pl.buckets([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [{"start": 1, "end": 3, "loss": 1.5},
                                                      {"start": 3, "end": 5, "loss": 3.5},
                                                      {"start": 5, "end": 6, "loss": 5.0}]


def test_long_documents_keep_the_first_tokens_of_long_ones(tokenizer, corpus):
    length = 3000  # bisect.py is shorter (2148 tokens of the micro tokenizer)
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(corpus).iterdir())]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    expected = sorted(tuple(x[:length]) for x in ids if len(x) >= length)
    assert 0 < len(expected) < len(ids)  # some documents are too short
    got = pl.long_documents(str(corpus), tokenizer, length)
    assert sorted(tuple(d.tolist()) for d in got) == expected
    assert len(pl.long_documents(str(corpus), tokenizer, length, max_docs=1)) == 1


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_eval_task_and_position_loss_cli_on_a_micro_model(micro, corpus, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "multikey", "--model", str(micro), "--lengths", "900", "--depths", "0,1", "--trials", "1",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "multikey.json").read_text())
    assert saved["task"] == "multikey" and len(saved["cells"]) == 2 and saved["lengths"] == [900]
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["mean_tokens"] <= 900 for c in saved["cells"])
    assert (out / "multikey.png").read_bytes()[:8] == PNG

    assert main(["eval", "position-loss", "--model", str(micro), "--length", "64", "--data", str(corpus),
                 "--max-docs", "2", "--bucket", "8", "--out", str(out)]) == 0
    (label, r), = json.loads((out / "position_loss.json").read_text()).items()
    assert r["length"] == 64 and r["documents"] == 2 and len(r["loss"]) == 63 and len(r["buckets"]) == 8
    assert r["buckets"][0] == {"start": 1, "end": 9, "loss": pytest.approx(sum(r["loss"][:8]) / 8)}
    assert (out / "position_loss.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("argv,message", [
    (["eval", "vartrack", "--model", "{micro}", "--lengths", "100", "--out", "{tmp}/o"],
     "cannot hold the vartrack prompt"),
    (["eval", "multivalue", "--model", "{micro}", "--lengths", "900", "--depths", "0,2", "--out", "{tmp}/o"],
     "--depths: every depth must be in [0, 1]"),
    (["eval", "position-loss", "--model", "{micro}", "--length", "100000", "--data", "{corpus}", "--out", "{tmp}/o"],
     "no document of"),
])
def test_bad_input_exits_2(micro, corpus, tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path, micro=micro, corpus=corpus) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
