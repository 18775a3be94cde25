"""longctx.data against hand-built expectations: packing, SFT masking, document isolation, bad data."""

import hashlib
import json
import logging
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longctx import data
from longctx.data import DataError, build_pretrain_dataset, collate, load_texts, workers

EOS, PAD, BOS, INST, END_INST = 0, 1, 2, 4, 5


def w(i: int) -> int:
    """Token id of the word ``w{i}`` in the test tokenizer."""
    return i + 6


@pytest.fixture(scope="module")
def tok():
    """Word-level tokenizer: ``w{i}`` -> i + 6, whitespace split, BOS added as a special token (tests/test_sft.py
    uses it too)."""
    words = ["<eos>", "<pad>", "<s>", "<unk>", "[INST]", "[/INST]"] + [f"w{i}" for i in range(1000)]
    t = Tokenizer(models.WordLevel({x: i for i, x in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    t.add_special_tokens(["[INST]", "[/INST]"])  # split out of glued text, as a real tokenizer's added tokens
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_docs(folder: Path, docs: list[list[int]]) -> Path:
    """One .txt file per document (sorted names keep the order); document = words w{i}."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, doc in enumerate(docs):
        (folder / f"doc{k:03d}.txt").write_text(" ".join(f"w{i}" for i in doc))
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows(ds, key="input_ids"):
    return [list(r) for r in ds[key]]


# ------------------------------------------------------------------------------------------------ packing


def test_packing_blocks_eos_and_every_token_once(tmp_path, tok, caplog):
    docs = [list(range(0, 5)), list(range(5, 8)), list(range(8, 19)), list(range(19, 21))]  # unique words
    src = write_docs(tmp_path / "docs", docs)
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_pretrain_dataset(str(src), tok, seq_len=6)
    # stream: 5+1, 3+1, 11+1, 2+1 = 25 tokens -> 4 rows of 6, the final 1 token (EOS of doc 4) dropped
    expected = [w(0), w(1), w(2), w(3), w(4), EOS,
                w(5), w(6), w(7), EOS, w(8), w(9),
                w(10), w(11), w(12), w(13), w(14), w(15),
                w(16), w(17), w(18), EOS, w(19), w(20)]
    assert rows(ds) == [expected[i:i + 6] for i in range(0, 24, 6)]
    assert rows(ds, "labels") == rows(ds)
    assert "position_ids" not in ds.column_names
    flat = [t for r in rows(ds) for t in r]
    words = [t for t in flat if t != EOS]
    assert words == [w(i) for i in range(21)]           # every word token once, in order
    assert [i for i, t in enumerate(flat) if t == EOS] == [5, 9, 21]
    assert "dropped the final 1 tokens" in caplog.text


def test_packing_exact_fit_drops_nothing(tmp_path, tok, caplog):
    src = write_docs(tmp_path / "d", [[0, 1, 2], [3, 4, 5, 6]])   # 4 + 5 = 9 tokens with EOS
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_pretrain_dataset(str(src), tok, seq_len=3)
    assert rows(ds) == [[w(0), w(1), w(2)], [EOS, w(3), w(4)], [w(5), w(6), EOS]]
    assert "dropped the final 0 tokens" in caplog.text


def test_min_doc_tokens_skips_counts_and_logs(tmp_path, tok, caplog):
    src = write_docs(tmp_path / "d", [[0, 1, 2, 3], [4], [5, 6, 7], [8, 9]])
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_pretrain_dataset(str(src), tok, seq_len=4, min_doc_tokens=3)
    assert rows(ds) == [[w(0), w(1), w(2), w(3)], [EOS, w(5), w(6), w(7)]]
    assert "skipped 2 of 4 documents with fewer than 3 tokens (3 tokens in all)" in caplog.text
    assert "dropped the final 1 tokens" in caplog.text


def test_empty_documents_are_skipped_and_logged(tmp_path, tok, caplog):
    src = write_docs(tmp_path / "d", [[0, 1], [], [2]])
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_pretrain_dataset(str(src), tok, seq_len=5)
    assert rows(ds) == [[w(0), w(1), EOS, w(2), EOS]]
    assert "skipped 1 of 3 documents" in caplog.text


def test_jsonl_text_field(tmp_path, tok):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"w{i} w{i + 1}", "id": i}) for i in (0, 2)))
    texts = load_texts(str(f), text_field="body")
    assert texts.column_names == ["text"] and list(texts["text"]) == ["w0 w1", "w2 w3"]
    ds = build_pretrain_dataset(str(f), tok, seq_len=3, text_field="body")
    assert rows(ds) == [[w(0), w(1), EOS], [w(2), w(3), EOS]]


def test_glob_and_parquet_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_docs(tmp_path / "g", [[0], [1], [2]])
    assert list(load_texts(str(tmp_path / "g" / "doc00[02].txt"))["text"]) == ["w0", "w2"]
    pq.write_table(pa.table({"text": ["w7 w8", "w9"]}), tmp_path / "p.parquet")
    assert list(load_texts(str(tmp_path / "p.parquet"))["text"]) == ["w7 w8", "w9"]


# ------------------------------------------------------------------------------------ document-aware packing


def test_document_aware_position_ids(tmp_path, tok):
    src = write_docs(tmp_path / "d", [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10, 11]])
    ds = build_pretrain_dataset(str(src), tok, seq_len=6, document_aware=True)
    # stream: w0 w1 w2 E | w3 w4 E | w5 .. w11 E  (16 tokens -> 2 rows, 4 dropped)
    assert rows(ds) == [[w(0), w(1), w(2), EOS, w(3), w(4)], [EOS, w(5), w(6), w(7), w(8), w(9)]]
    # positions restart at each document and at each row (doc 2 continues into row 2 as a new sequence)
    assert rows(ds, "position_ids") == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    batch = collate([ds[0], ds[1]], pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}   # no attention_mask: transformers isolates
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]


def test_document_aware_attention_isolation(tmp_path, tok):
    docs = [list(range(0, 7)), list(range(7, 16)), list(range(16, 30))]
    src = write_docs(tmp_path / "d", docs)
    ds = build_pretrain_dataset(str(src), tok, seq_len=24, document_aware=True)
    batch = collate([ds[0]], pad_token_id=PAD)
    assert batch["input_ids"][0, 8:18].tolist() == [w(i) for i in range(7, 16)] + [EOS]

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                       use_cache=False).logits[0]
        for lo, hi in [(0, 8), (8, 18)]:                      # documents 1 and 2 with their EOS
            alone = model(input_ids=batch["input_ids"][:, lo:hi], position_ids=torch.arange(hi - lo)[None],
                          use_cache=False).logits[0]
            torch.testing.assert_close(packed[lo:hi], alone, rtol=1e-5, atol=1e-5)
        # control: plain causal packing lets document 2 see document 1, so its logits differ
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert (leaky[8:18] - packed[8:18]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- batches


def test_collate_pads_sft_rows_to_longest():
    feats = [{"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}, {"input_ids": [5], "labels": [5]}]
    b = collate(feats, pad_token_id=PAD)
    assert b["input_ids"].tolist() == [[7, 8, 9], [5, PAD, PAD]]
    assert b["labels"].tolist() == [[-100, 8, 9], [5, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    b = data.DataCollator(PAD, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[7, 8, 9, PAD], [5, PAD, PAD, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_collate_stacks_packed_rows():
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}]
    b = collate(feats, pad_token_id=None)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]] and b["labels"].tolist() == b["input_ids"].tolist()
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]


# ------------------------------------------------------------------------------------------------- bad data


def test_error_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty source: directory .*empty has no"):
        load_texts(str(tmp_path / "empty"))


def test_error_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty source: .*e\.jsonl is empty \(0 bytes\)"):
        load_texts(str(tmp_path / "e.jsonl"))


def test_error_only_empty_documents(tmp_path):
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match=r"empty source: all 1 documents in .*blank\.txt are empty"):
        load_texts(str(tmp_path / "blank.txt"))


def test_error_glob_matches_nothing_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"empty source: no files match .*\*\.txt"):
        load_texts(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))


def test_error_non_utf8_names_file(tmp_path):
    write_docs(tmp_path / "d", [[1]])
    (tmp_path / "d" / "bad.txt").write_bytes(b"w1 \xff\xfe w2")
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8 \(byte 3"):
        load_texts(str(tmp_path / "d"))


def test_error_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "locked.txt"
    f.write_text("w1")
    real = Path.read_bytes

    def deny(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match=r"cannot read file .*locked\.txt: Permission denied"):
        load_texts(str(f))


def test_error_missing_text_field_lists_columns(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"content": "w1", "id": 1}, {"content": "w2", "id": 2}])
    with pytest.raises(DataError, match=r"m\.jsonl: missing field 'text' \(available: content, id\)"):
        load_texts(str(f))


def test_error_null_text_counts_rows(tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [{"text": "w1"}, {"text": None}, {"text": None}])
    with pytest.raises(DataError, match=r"n\.jsonl: field 'text' is null in 2 of 3 rows"):
        load_texts(str(f))


def test_error_fewer_tokens_than_one_block(tmp_path, tok):
    src = write_docs(tmp_path / "d", [[0, 1], [2]])
    with pytest.raises(DataError, match=r"5 tokens in 2 documents .* fewer than one block of seq_len=8"):
        build_pretrain_dataset(str(src), tok, seq_len=8)


def test_error_unknown_builtin():
    with pytest.raises(DataError, match=r"unknown builtin source 'builtin:nope'; available: builtin:python-stdlib"):
        load_texts("builtin:nope")


# ------------------------------------------------------------------------------------------ python stdlib


def test_stdlib_split_is_deterministic_disjoint_and_excludes_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = data.stdlib_files("train"), data.stdlib_files("validation")
    assert train == data.stdlib_files("train") and val == data.stdlib_files("validation")
    rel_train = [p.relative_to(root).as_posix() for p in train]
    rel_val = [p.relative_to(root).as_posix() for p in val]
    assert rel_train == sorted(rel_train) and rel_val == sorted(rel_val)
    assert not set(rel_train) & set(rel_val)
    for r in rel_train + rel_val:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(r.split("/")[:-1]), r
        split = "validation" if int(hashlib.sha1(r.encode()).hexdigest(), 16) % 100 < 5 else "train"
        assert split == ("validation" if r in rel_val else "train"), r
    assert len(train) + len(val) > 500 and 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert {"os.py", "asyncio/tasks.py"} <= set(rel_train + rel_val)


def test_stdlib_load_texts_one_document_per_file():
    val = data.stdlib_files("validation")
    texts = load_texts("builtin:python-stdlib", split="validation")
    assert texts.column_names == ["text"] and len(texts) == len(val)
    assert texts[0]["text"] == val[0].read_text(encoding="utf-8")
    with pytest.raises(DataError, match="split must be 'train' or 'validation'"):
        load_texts("builtin:python-stdlib", split="test")


def test_num_proc_bounded_by_cores(monkeypatch):
    monkeypatch.setattr(workers, "cpu_cores", lambda: 2)
    assert workers.num_proc(64, rows=10_000) == 2
    assert workers.num_proc(None, rows=10_000) == 2
    assert workers.num_proc(8, rows=10) is None


# -------------------------------------------------------------- the validation split of local sources (issue 18)


def by_rule(text: str) -> bool:
    """The written rule: SHA-1 of the text, as a number, mod 100 below 5 -> validation."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100 < 5


def test_validation_split_by_hash_of_the_text(tmp_path):
    src = write_docs(tmp_path / "d", [[k, k + 1] for k in range(0, 400, 2)])   # 200 distinct documents
    texts = [(src / f"doc{k:03d}.txt").read_text() for k in range(200)]
    train = list(load_texts(str(src), split="train")["text"])
    val = list(load_texts(str(src), split="validation")["text"])
    assert val == [t for t in texts if by_rule(t)] and train == [t for t in texts if not by_rule(t)]
    assert 0 < len(val) < 25
    assert list(load_texts(str(src))["text"]) == texts                     # split None: the whole source
    assert list(load_texts(str(src), split="validation")["text"]) == val   # the same on every call


def test_small_sources_still_get_both_parts(tmp_path):
    texts = ["w1", "w2", "w3"]
    assert not any(by_rule(t) for t in texts)          # the hash alone would hold out nothing
    src = write_docs(tmp_path / "d", [[1], [2], [3]])
    lowest = min(texts, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    assert list(load_texts(str(src), split="validation")["text"]) == [lowest]
    assert sorted(load_texts(str(src), split="train")["text"]) == sorted(set(texts) - {lowest})
    one = write_docs(tmp_path / "one", [[1]])
    assert list(load_texts(str(one), split="train")["text"]) == ["w1"]
    with pytest.raises(DataError, match=r"no documents in its validation part .*; set data.eval"):
        load_texts(str(one), split="validation")


def eval_and_train_tokens(cfg, tok):
    from longctx import evaluate, trainer

    train = {t for row in trainer.build_dataset(cfg, tok, "train")["input_ids"] for t in row} - {EOS}
    evaluated = set(evaluate.run_eval_tokens(cfg, tok).tolist()) - {EOS}
    return train, evaluated


def held_out_words(folder: Path) -> set[int]:
    """Token ids of the documents the written rule holds out: by_rule, else the one with the lowest SHA-1."""
    texts = [f.read_text() for f in sorted(folder.iterdir())]
    held = [t for t in texts if by_rule(t)] or [min(texts, key=lambda t: hashlib.sha1(t.encode()).hexdigest())]
    return {w(int(x[1:])) for t in held for x in t.split()}


@pytest.mark.parametrize("weighted", [False, True])
def test_training_never_sees_what_evaluation_reads(tmp_path, tok, weighted):
    """A local data.train without data.eval: evaluation reads its held-out documents, training never does, also for
    weighted sources (every word belongs to one document, so a shared token would be a shared document)."""
    from longctx.config import load_config

    a = write_docs(tmp_path / "a", [list(range(10 * k, 10 * k + 10)) for k in range(30)])
    b = write_docs(tmp_path / "b", [list(range(300 + 10 * k, 310 + 10 * k)) for k in range(30)])
    train = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}] if weighted else str(a)
    cfg = load_config(data={"model": {"name_or_path": "m"}, "train": {"seq_len": 16}, "eval": {"lengths": [8]},
                            "data": {"train": train, "num_proc": 1}})
    trained, evaluated = eval_and_train_tokens(cfg, tok)
    held = held_out_words(a) | (held_out_words(b) if weighted else set())
    assert evaluated and evaluated <= held and not trained & held
    assert len({w(i) for i in range(300)} - held - trained) < 16   # the rest of A, but the final partial row
    # with data.eval, training reads data.train whole and evaluation reads data.eval whole
    cfg = load_config(data={"model": {"name_or_path": "m"}, "train": {"seq_len": 16}, "eval": {"lengths": [8]},
                            "data": {"train": str(a), "eval": str(b), "num_proc": 1}})
    trained, evaluated = eval_and_train_tokens(cfg, tok)
    assert len({w(i) for i in range(300)} - trained) < 16 and evaluated <= {w(i) for i in range(300, 600)}
    assert len(evaluated) > 250


# ------------------------------------------------------------------------------- code and other plain-text files


def test_code_directory_one_document_per_file(tmp_path, caplog):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "a.py").write_text("print('a')\n")
    (repo / "b.md").write_text("# B\n")
    (repo / "sub" / "d.py").write_text("x = 1\n")
    (repo / "c.rs").write_text("fn main() {}\n")
    (repo / "logo.png").write_bytes(b"\x89PNG")
    (repo / ".git" / "hook.py").write_text("hidden\n")
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        texts = load_texts(str(repo), suffixes=[".py", ".md"])
    assert list(texts["text"]) == ["print('a')\n", "# B\n", "x = 1\n"]           # a.py, b.md, sub/d.py
    assert "reading 3 files; left out 1 hidden files/folders and 2 files of other types (1 .png, 1 .rs)" in caplog.text
    assert list(load_texts(str(repo / "*.rs"), suffixes=[".rs"])["text"]) == ["fn main() {}\n"]
    with pytest.raises(DataError, match=r"directory .*repo has no \.txt/\.jsonl/\.json/\.parquet files \(data.suffixes"):
        load_texts(str(repo))
    with pytest.raises(DataError, match=r"unsupported file type .*a\.py .*data.suffixes adds plain-text types"):
        load_texts(str(repo / "a.py"))


def test_skip_bad_rows_skips_unreadable_files_with_a_count(tmp_path, caplog):
    src = write_docs(tmp_path / "d", [[1], [2]])
    (src / "bad.txt").write_bytes(b"w1 \xff")
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8"):
        load_texts(str(src))
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        assert list(load_texts(str(src), skip_bad_files=True)["text"]) == ["w1", "w2"]
    assert "skipped 1 of 3 files (data.skip_bad_rows): the first: file " in caplog.text


# ------------------------------------------------------------------------------------------- weighted sources


def test_weighted_pretraining_sources(tmp_path, tok, caplog):
    """A: 4 documents of 9 words (10 tokens with EOS), B: 4 of 4 (5); weights 1:1 of 60 tokens = 30 each: A gives 3
    documents, B one whole copy and 2 more; 60 tokens = 6 rows of 10, in one seeded order."""
    a = write_docs(tmp_path / "a", [list(range(10 * k, 10 * k + 9)) for k in range(4)])
    b = write_docs(tmp_path / "b", [list(range(100 + 10 * k, 104 + 10 * k)) for k in range(4)])
    sources = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}]
    with caplog.at_level(logging.INFO, logger="longctx.data"):
        ds = build_pretrain_dataset(sources, tok, seq_len=10, seed=5)
    flat = [t for r in rows(ds) for t in r]
    assert len(flat) == 60 and sum(t < w(100) and t != EOS for t in flat) == 27 and sum(t >= w(100) for t in flat) == 24
    assert "dropped the final 0 tokens" in caplog.text and "50.0% of the mixture (weight 50.0%)" in caplog.text
    assert rows(build_pretrain_dataset(sources, tok, seq_len=10, seed=5)) == rows(ds)
    assert rows(build_pretrain_dataset(sources, tok, seq_len=10, seed=6)) != rows(ds)


def test_eval_cli_and_training_free_sweeps_read_the_same_validation_part(tmp_path, tok, monkeypatch):
    """`longctx eval ppl --data A B --split validation` (what a training-free sweep run calls) evaluates the stream a
    training run with data.train [A, B] evaluates; with data.eval the sweep passes it whole (no --split)."""
    from longctx import evaluate
    from longctx.config import load_config
    from longctx.sweep.job import eval_args
    from longctx.sweep.spec import Run

    a = write_docs(tmp_path / "a", [list(range(10 * k, 10 * k + 10)) for k in range(30)])
    b = write_docs(tmp_path / "b", [list(range(300 + 10 * k, 310 + 10 * k)) for k in range(30)])
    base = {"model": {"name_or_path": "m"}, "train": {"seq_len": 16}, "eval": {"lengths": [8]}}
    cfg = load_config(data={**base, "data": {"train": [str(a), {"path": str(b), "weight": 3}]}})
    args = eval_args(Run("r", {}, tmp_path / "r", [], cfg))
    i = args.index("--data")
    assert args[i + 1:i + 5] == [str(a), str(b), "--split", "validation"]
    parsed = evaluate_parser().parse_args(args)
    seen = {}

    def perplexity(model, tokens, length, *args, **kwargs):  # records the stream instead of running a model
        seen["t"] = tokens
        return {"length": length, "stride": length, "nll": 1.0, "ppl": 2.72, "tokens": 7, "windows": 1}

    monkeypatch.setattr(evaluate, "load_for_eval", lambda *a, **k: (None, tok, "m"))
    monkeypatch.setattr(evaluate, "perplexity", perplexity)
    assert parsed.func(parsed) == 0
    assert torch.equal(seen["t"], evaluate.run_eval_tokens(cfg, tok))
    cfg = load_config(data={**base, "data": {"train": str(a), "eval": str(b)}})
    args = eval_args(Run("r", {}, tmp_path / "r", [], cfg))
    assert args[args.index("--data") + 1:args.index("--data") + 3] == [str(b), "--dtype"]


def evaluate_parser():
    import argparse

    from longctx import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_parsers(parser.add_subparsers(dest="command"))
    return parser
