"""The deterministic validation split: which documents are held out of training when `data.eval` is not set.

A document goes to validation when SHA-1 of its key, read as a number, is below VALIDATION_PERCENT mod 100: the
relative path for `builtin:python-stdlib` files, the text itself for every other source (so exact duplicates never
straddle the split, and the split does not move when files are added, renamed or reordered). A source of two or more
documents that the hash leaves without a validation document gives its lowest-hash one (and one with only validation
documents keeps its highest-hash one for training), so a small corpus has both parts; one document is all training.
Training reads the "train" part and evaluation the "validation" part, never both (issue 18: perplexity was reported
on the training documents).
"""

from __future__ import annotations

import hashlib

import numpy as np

VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")


def digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def split_of(key: str) -> str:
    """"validation" for about VALIDATION_PERCENT% of keys, else "train"; the same on every machine and run."""
    return "validation" if int(digest(key), 16) % 100 < VALIDATION_PERCENT else "train"


def validation_mask(digests: list[str]) -> np.ndarray:
    """Bool per document (given by its key's `digest`): held out for validation, with the small-corpus rule above."""
    if len(digests) < 2:
        return np.zeros(len(digests), dtype=bool)
    mask = np.asarray([int(d, 16) % 100 < VALIDATION_PERCENT for d in digests], dtype=bool)
    order = np.argsort(np.asarray(digests), kind="stable")  # fixed-width hex: string order is numeric order
    if not mask.any():
        mask[order[0]] = True
    if mask.all():
        mask[order[-1]] = False
    return mask
