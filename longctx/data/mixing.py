"""Weighted mixing of several sources into one fixed dataset, deterministic under the seed.

    data:
      train: [{path: long-docs/, weight: 0.3}, {path: chats.jsonl, weight: 0.7}]

A weight is a share of the training *tokens* (long documents and short instructions differ 100x in length, so a
share of rows would say little). The mixture holds as many tokens as all sources together; source i contributes
weight_i / sum(weights) of them: whole copies of itself while they fit, then a seeded random subset of its
examples. So a source above its share is subsampled and one below it repeated; nothing else changes its share.
The result is a fixed list of (source, example) picks, the same for the same seed and data, so a resumed run sees
the same rows in the same order (Trainer resumes by skipping batches of its seeded sampler).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def mixture(lengths: list[np.ndarray], weights: list[float], seed: int) -> list[np.ndarray]:
    """Example indices to take from each source (with repeats), for token shares `weights` (normalised)."""
    if len(lengths) != len(weights) or not lengths:
        raise ValueError("mixture: one weight per source")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"mixture: weights must be finite and > 0, got {weights}")
    tokens = [int(np.sum(n)) for n in lengths]
    total = sum(tokens)
    picks = []
    for i, (n, budget) in enumerate(zip(lengths, w / w.sum() * total)):
        copies = int(budget // tokens[i]) if tokens[i] else 0
        order = np.random.default_rng([seed, i]).permutation(len(n))
        rest = budget - copies * tokens[i]
        # the examples of a random order while their tokens stay within the rest (at least one when rest > 0)
        take = int(np.searchsorted(np.cumsum(n[order]), rest, side="right"))
        if rest > 0 and take == 0 and len(n):
            take = 1
        picks.append(np.concatenate([np.tile(np.arange(len(n)), copies), np.sort(order[:take])]).astype(np.int64))
    return picks


def log_mixture(names: list[str], lengths: list[np.ndarray], weights: list[float], picks: list[np.ndarray]) -> None:
    used = [int(np.sum(n[p])) for n, p in zip(lengths, picks)]
    total = sum(used) or 1
    for name, n, w, p, u in zip(names, lengths, weights, picks, used):
        log.info("mixture: %s: %d of its %d examples drawn %d times in all (%.2fx its %d tokens), %d tokens = "
                 "%.1f%% of the mixture (weight %.1f%%)", name, len(np.unique(p)), len(n), len(p),
                 u / max(1, int(np.sum(n))), int(np.sum(n)), u, 100 * u / total, 100 * w / sum(weights))
