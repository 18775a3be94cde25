"""data/tiny-base loads with plain transformers, round-trips text and is a trained short-context model."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-base"

SNIPPET = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return f"Point({self.x!r}, {self.y!r})"
'''


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY).eval()


def test_files_and_size():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file()) <= 10_000_000


def test_config_is_a_short_context_llama(model):
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.max_position_embeddings == 256
    assert cfg.rope_parameters["rope_type"] == "default" and cfg.rope_parameters["rope_theta"] == 10000.0
    assert 4096 <= cfg.vocab_size <= 8192
    assert 2e6 <= sum(p.numel() for p in model.parameters()) <= 6e6


@pytest.mark.parametrize("text", [SNIPPET, "  leading spaces\ttabs\r\nand CRLF  ", "héllo — 世界 🙂 ∑x²", "",
                                  "<|endoftext|> inside text"])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer, model):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    assert tokenizer("x = 1", add_special_tokens=True)["input_ids"] == tokenizer("x = 1", add_special_tokens=False)[
        "input_ids"]


def test_model_is_trained_on_python(tokenizer, model):
    ids = torch.tensor([tokenizer(SNIPPET, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] < 256
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.5, f"loss {loss:.2f}: an untrained model gives ~{torch.log(torch.tensor(4096.0)):.1f}"
