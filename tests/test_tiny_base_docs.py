"""The synthetic retrieval documents of scripts/make_tiny_base.py (issue 14 section 1): the passkey document
starts with exactly the prompt `longctx eval passkey` feeds the model, fits a 256-token training row, and its
answer is the key; the key-value and copy documents end with the value / line they ask for."""

import random
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from longctx.evaluate import passkey_correct, passkey_key, passkey_prompt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from tiny_base_docs import (MAX_FILLER, copy_document, kv_document, passkey_document,  # noqa: E402
                            random_passkey_document)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-base")


@pytest.mark.parametrize("length", [96, 160, 256])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_document_starts_with_the_eval_prompt(tokenizer, length, depth):
    key = passkey_key(0, length, depth, 0)
    prompt = passkey_prompt(tokenizer, length, depth, key)  # the reference: what the eval feeds the model
    ids, answer_start = passkey_document(tokenizer, prompt["filler"], depth, key)
    assert ids[:answer_start] == prompt["input_ids"]
    answer = tokenizer.decode(ids[answer_start:], skip_special_tokens=True)
    assert answer == f" {key}." and passkey_correct(answer, key)
    assert ids[-1] == tokenizer.eos_token_id


def test_passkey_documents_fit_256_and_cover_the_eval_range(tokenizer):
    # the 256-token eval prompt needs no more filler than the builder draws, and the builder's documents
    # (shortened to fit 256 tokens with their answer) reach to within one filler sentence of that prompt
    eval_prompt = passkey_prompt(tokenizer, 256, 0.5, "12345")
    assert eval_prompt["filler"] <= MAX_FILLER
    rng = random.Random(0)
    docs = [random_passkey_document(tokenizer, rng, 256) for _ in range(200)]
    assert all(len(ids) <= 256 for ids, _ in docs)
    assert max(start for _, start in docs) >= eval_prompt["tokens"] - 12
    keys = [tokenizer.decode(ids[start:], skip_special_tokens=True) for ids, start in docs]
    assert all(k.startswith(" ") and k.endswith(".") and k[1:-1].isdigit() and len(k) == 7 for k in keys)
    assert len(set(keys)) > 190  # random keys, not a few memorisable ones


def test_kv_document_answer_is_the_looked_up_value(tokenizer):
    rng = random.Random(1)
    for _ in range(50):
        ids, start = kv_document(tokenizer, rng, 256)
        assert len(ids) <= 256 and ids[-1] == tokenizer.eos_token_id
        prompt, answer = tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:-1])
        namespace = {}
        exec(prompt.rsplit("\n", 1)[0], namespace)  # the dict literal is real Python
        key = prompt.rsplit("'", 2)[1]
        assert int(answer) == namespace["table"][key]


def test_copy_document_repeats_its_first_line(tokenizer):
    rng = random.Random(2)
    lines = [f"    x{i} = f(y{i})" for i in range(100)]
    for _ in range(50):
        ids, start = copy_document(tokenizer, rng, lines, 256)
        assert len(ids) <= 256 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids[:-1])
        first = text.split("\n", 1)[0] + "\n"
        assert tokenizer.decode(ids[start:-1]) == first and text.endswith(first)
