"""Packing: documents into a token stream cut in rows (pretraining), examples into rows by best-fit (SFT).

Both write fixed rows of exactly `seq_len` tokens (the S2 group size is a fraction of the row length, so every
batch has the same groups). position_ids restart at 0 at each document or example: with attention_mask=None
transformers (masking_utils.find_packed_sequence_indices, no KV cache) and S2 (longctx/attention.py) then keep
attention inside each one.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa

IGNORE = -100  # label of a token that is not trained (transformers' ignore_index)


def _flat(column: pa.ChunkedArray | pa.Array | list) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column; list i is values[offsets[i]:offsets[i + 1]]."""
    if isinstance(column, (pa.ListArray, pa.LargeListArray, pa.ChunkedArray)):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = column.flatten().to_numpy(zero_copy_only=False)
    else:
        lengths = np.asarray([len(d) for d in column], dtype=np.int64)
        values = np.concatenate([np.asarray(d) for d in column]) if len(column) else np.zeros(0, np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)])


def pack_documents(docs: list[np.ndarray] | pa.ListArray, eos_token_id: int, seq_len: int,
                   document_aware: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of exactly ``seq_len``.

    Returns (columns, remainder): ``input_ids`` of shape (rows, seq_len), and with ``document_aware``
    ``position_ids`` that restart at 0 at each document start and at each row start (a document cut by a
    row boundary continues as a new sequence). The last ``remainder`` tokens (< seq_len) do not fill a row
    and are not used; every other token appears exactly once, in order.
    """
    flat, offsets = _flat(docs)
    lengths = np.diff(offsets)
    dtype = np.int32 if max(int(flat.max(initial=0)), eos_token_id) < 2**31 else np.int64
    ends = np.cumsum(lengths + 1)                       # position of each EOS is ends - 1
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_eos = np.zeros(len(stream), dtype=bool)
    is_eos[ends - 1] = True
    stream[is_eos] = eos_token_id
    stream[~is_eos] = flat
    rows = len(stream) // seq_len
    remainder = len(stream) - rows * seq_len
    out = {"input_ids": stream[: rows * seq_len].reshape(rows, seq_len)}
    if document_aware:
        n = rows * seq_len
        starts = np.zeros(n, dtype=bool)
        doc_starts = np.concatenate([[0], ends[:-1]])
        starts[doc_starts[doc_starts < n]] = True
        starts[::seq_len] = True
        index = np.arange(n, dtype=np.int64)
        out["position_ids"] = (index - np.maximum.accumulate(np.where(starts, index, 0))).astype(
            np.int32).reshape(rows, seq_len)
    return out, remainder


class _FreeSpace:
    """Open rows by free space, for best fit: `take(n)` returns an open row with the least free space >= n, in
    O(log seq_len) (a segment tree of "some row has exactly this much free space" over 0..seq_len)."""

    def __init__(self, seq_len: int):
        self.size = 1 << (seq_len + 1).bit_length()
        self.any = [False] * (2 * self.size)
        self.rows: dict[int, list[int]] = {}

    def _mark(self, free: int, value: bool) -> None:
        i = free + self.size
        self.any[i] = value
        while i > 1:
            i //= 2
            self.any[i] = self.any[2 * i] or self.any[2 * i + 1]

    def add(self, free: int, row: int) -> None:
        self.rows.setdefault(free, []).append(row)
        self._mark(free, True)

    def take(self, n: int) -> tuple[int, int] | None:
        """(free space, row) of the best-fitting open row for n tokens, removed from the open rows; None if none."""
        i = n + self.size
        if not self.any[i]:
            while i > 1 and not (i % 2 == 0 and self.any[i + 1]):  # climb until a right sibling holds a row
                i //= 2
            if i == 1:
                return None
            i += 1
            while i < self.size:  # the leftmost (smallest free space) below
                i = 2 * i if self.any[2 * i] else 2 * i + 1
        free = i - self.size
        rows = self.rows[free]
        row = rows.pop()
        if not rows:
            del self.rows[free]
            self._mark(free, False)
        return free, row


def best_fit(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, every example in exactly one row of at most seq_len tokens.

    Longest first (ties in index order), each into the open row it fills best, else a new row. Deterministic.
    """
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"best_fit: an example of {int(lengths.max())} tokens does not fit seq_len={seq_len}")
    rows: list[list[int]] = []
    space = _FreeSpace(seq_len)
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        found = space.take(n)
        if found is None:
            free, row = seq_len, len(rows)
            rows.append([])
        else:
            free, row = found
        rows[row].append(int(i))
        if free - n > 0:
            space.add(free - n, row)
    return rows


def pack_examples(input_ids, labels, seq_len: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Examples (lists of token ids and labels, each <= seq_len) packed by `best_fit` into rows of seq_len.

    position_ids restart at 0 at each example and at the padding after the last one; the first token of each
    example gets label IGNORE (nothing before it in its example predicts it), padding is IGNORE throughout. So the
    loss of a row is the loss of its examples, each alone.
    """
    ids, offsets = _flat(input_ids)
    labs, _ = _flat(labels)
    lengths = np.diff(offsets)
    bins = best_fit(lengths, seq_len)
    dtype = np.int32 if max(int(ids.max(initial=0)), pad_token_id) < 2**31 else np.int64
    out_ids = np.full((len(bins), seq_len), pad_token_id, dtype=dtype)
    out_labels = np.full((len(bins), seq_len), IGNORE, dtype=dtype)
    out_pos = np.zeros((len(bins), seq_len), dtype=np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            lo, hi = offsets[i], offsets[i + 1]
            n = hi - lo
            out_ids[r, at:at + n] = ids[lo:hi]
            out_labels[r, at:at + n] = labs[lo:hi]
            out_labels[r, at] = IGNORE
            out_pos[r, at:at + n] = ramp[:n]
            at += n
        out_pos[r, at:] = ramp[:seq_len - at]
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}


def rows_to_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    """Equal-width numpy matrices as a Dataset of fixed-size list columns (no copy through Python lists)."""
    arrays = [pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
              for matrix in columns.values()]
    return datasets.Dataset(pa.Table.from_arrays(arrays, names=list(columns)))
