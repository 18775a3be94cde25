"""scripts/bench_smollm2.py's measurement on the micro model: the PPL at every length read from one long forward
equals `longctx eval ppl`'s window perplexity (evaluate.perplexity) for position-independent scaling, dynamic
scaling is measured one forward per length (else it would be wrong), and the fine-tune's corpus leaves the
evaluation documents out. The SmolLM2 run itself takes hours: its results are benchmarks/smollm2.md."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from longctx import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_smollm2", ROOT / "scripts" / "bench_smollm2.py")
bs = sys.modules["bench_smollm2"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)

ARGS = Namespace(lengths=[32, 96, 128], bin=16, passkey_lengths=[], passkey_depths=[0.5], passkey_trials=1, seed=0)


def docs(vocab: int) -> list:
    g = torch.Generator().manual_seed(3)
    return [(Path(f"doc{i}.py"), torch.randint(0, vocab, (n,), generator=g)) for i, n in enumerate([160, 100])]


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_ppl_at_each_length_equals_window_perplexity(micro, rope_type):
    model, tok, _ = ev.load_for_eval(str(micro), rope={"rope_type": rope_type, "factor": 4.0,
                                                        "original_max_position_embeddings": 64})
    d = docs(model.config.vocab_size)
    got = bs.measure(model, tok, d, ARGS, length_dependent=bs.ARMS[rope_type][3])
    for L in ARGS.lengths:
        # the reference: evaluate.perplexity on the first L tokens of each document that has L tokens
        refs = [ev.perplexity(model, ids[:L], L) for _, ids in d if ids.numel() >= L]
        nll = sum(r["nll"] * r["tokens"] for r in refs) / sum(r["tokens"] for r in refs)
        assert got["ppl"][str(L)]["tokens"] == sum(r["tokens"] for r in refs)
        assert got["ppl"][str(L)]["ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5), L
    assert len(got["position_loss"]["mean_nll"]) == 128 // 16  # bins of the longest forward (127 predictions)
    if rope_type == "dynamic":  # reading dynamic's short lengths off its long forward would give other numbers
        wrong = bs.measure(model, tok, d, ARGS, length_dependent=False)
        assert abs(wrong["ppl"]["32"]["ppl"] - got["ppl"]["32"]["ppl"]) > 1e-3


def test_training_corpus_leaves_the_evaluation_documents_out(tmp_path):
    from longctx.data.sources import stdlib_files

    train = stdlib_files("train")
    held = sorted(train, key=lambda p: -p.stat().st_size)[:2]
    corpus = bs.training_corpus(tmp_path, held)
    linked = {p.resolve() for p in corpus.iterdir()}
    assert linked == {p.resolve() for p in train} - {p.resolve() for p in held}
    assert len(list(corpus.iterdir())) == len(train) - 2  # flat names do not collide


def test_unknown_arm_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bs.parse_args(["--arms", "none,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
