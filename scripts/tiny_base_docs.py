"""Synthetic retrieval documents for scripts/make_tiny_base.py (issue 14 section 1).

Each builder returns token ids of one document that fits in a 256-token training row and whose last tokens
can only be predicted by looking back inside the document:
- passkey: the eval's own prompt (longctx.evaluate.passkey_parts, tokenized exactly as `longctx eval passkey`
  tokenizes it) followed by the answer " KEY." and EOS;
- key-value lookup: a Python dict literal, then `assert table['k'] == V` for one of its keys;
- copy: a line with a random identifier, a few stdlib lines, then the same line again.
Kept apart from the build script so a unit test can check them without training anything.
"""

from __future__ import annotations

import random
import string

from longctx.evaluate import passkey_parts

MAX_FILLER = 23  # filler sentences: the eval's prompt at 256 tokens holds about 23 (docs/tiny-retrieval probe)


def passkey_answer_ids(tokenizer, key: str) -> list[int]:
    """The tokens the model must produce after the prompt: " KEY." then EOS."""
    return tokenizer(" " + key + ".", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def passkey_document(tokenizer, n_filler: int, depth: float, key: str) -> tuple[list[int], int]:
    """(ids, answer_start): the eval's passkey prompt with n_filler sentences and the key at `depth`, then the
    answer. The prompt is tokenized on its own, like `longctx.evaluate.passkey_prompt`, so the training
    document starts with exactly the tokens the evaluation feeds the model."""
    before, after = passkey_parts(n_filler, depth, key)
    prompt = tokenizer(before + after).input_ids
    return prompt + passkey_answer_ids(tokenizer, key), len(prompt)


def random_passkey_document(tokenizer, rng: random.Random, max_tokens: int) -> tuple[list[int], int]:
    """A passkey document with a random 5-digit key, a uniform depth and 0-23 filler sentences (half of the
    time 14-23, the lengths the 256-token eval uses), shortened until it fits in max_tokens."""
    n = rng.randint(14, MAX_FILLER) if rng.random() < 0.5 else rng.randint(0, MAX_FILLER)
    depth, key = rng.random(), str(rng.randint(10000, 99999))
    while True:
        ids, start = passkey_document(tokenizer, n, depth, key)
        if len(ids) <= max_tokens or n == 0:
            return ids, start
        n -= 1


def _name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7))) + rng.choice(["", "_id", "_count", "2"])


def kv_document(tokenizer, rng: random.Random, max_tokens: int) -> tuple[list[int], int]:
    """A dict of 3-12 random names to random numbers, then an assert on one of them; the value is the answer."""
    n = rng.randint(3, 12)
    while True:
        names = list(dict.fromkeys(_name(rng) for _ in range(n)))
        values = [rng.randint(0, 99999) for _ in names]
        pairs = "".join(f"    '{k}': {v},\n" for k, v in zip(names, values))
        i = rng.randrange(len(names))
        prompt = f"table = {{\n{pairs}}}\nassert table['{names[i]}'] =="
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = p + tokenizer(f" {values[i]}\n", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(ids) <= max_tokens or n <= 2:
            return ids, len(p)
        n -= 1


def copy_document(tokenizer, rng: random.Random, lines: list[str], max_tokens: int) -> tuple[list[int], int]:
    """`NAME = 'hex'`, 2-12 stdlib lines, then the first line again (the copy is the answer)."""
    target = f"{_name(rng)}_{rng.randint(0, 999)} = '{rng.getrandbits(32):08x}'\n"
    k = rng.randint(2, 12)
    while True:
        start = rng.randrange(max(1, len(lines) - k))
        middle = "".join(line + "\n" for line in lines[start:start + k])
        p = tokenizer(target + middle, add_special_tokens=False).input_ids
        ids = p + tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(ids) <= max_tokens or k <= 0:
            return ids[:max_tokens], len(p)
        k -= 1
