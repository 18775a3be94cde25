"""Pretraining rows: documents tokenized, each followed by EOS, packed into rows of exactly `seq_len` tokens.

    build_pretrain_dataset("builtin:python-stdlib", tokenizer, 1024, split="train")
    build_pretrain_dataset([{"path": "books/", "weight": 0.7}, {"path": "repo/", "weight": 0.3}], tokenizer, 8192,
                           split="train", suffixes=[".txt", ".py"], seed=42)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa

from longctx.data.errors import DataError
from longctx.data.mixing import log_mixture, mixture
from longctx.data.packing import pack_documents, rows_to_dataset
from longctx.data.sources import as_sources, load_texts
from longctx.data.workers import main_process_first, num_proc as _num_proc

log = logging.getLogger(__name__)


def tokenize_documents(texts: datasets.Dataset, tokenizer, num_proc: int | None) -> datasets.Dataset:
    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    return texts.map(tokenize, batched=True, remove_columns=texts.column_names,
                     num_proc=_num_proc(num_proc, len(texts)), desc="tokenize")


def _documents(path: str, tokenizer, split, text_field, hub_config, hub_split, min_doc_tokens, num_proc, suffixes,
               skip_bad_rows) -> pa.ListArray:
    """One source's tokenized documents, those under `min_doc_tokens` (and empty ones) left out with a count."""
    texts = load_texts(path, split, text_field, hub_config, hub_split, suffixes, skip_bad_rows, num_proc)
    docs = tokenize_documents(texts, tokenizer, num_proc).data.column("input_ids").combine_chunks()
    lengths = docs.value_lengths().to_numpy(zero_copy_only=False)
    keep = lengths >= max(1, min_doc_tokens)
    skipped = int((~keep).sum())
    if skipped:
        why = f"with fewer than {min_doc_tokens} tokens" if min_doc_tokens > 1 else "that are empty"
        log.warning("%s: skipped %d of %d documents %s (%d tokens in all)", path, skipped, len(lengths), why,
                    int(lengths[~keep].sum()))
        docs = docs.filter(pa.array(keep))
    return docs


def build_pretrain_dataset(source, tokenizer, seq_len: int, split: str | None = None, text_field: str = "text",
                           hub_config: str | None = None, hub_split: str = "train", min_doc_tokens: int = 0,
                           document_aware: bool = False, num_proc: int | None = None,
                           suffixes: Sequence[str] | None = None, seed: int = 0, skip_bad_rows: bool = False,
                           mix: bool = True) -> datasets.Dataset:
    """LongLoRA pretraining rows: documents tokenized (batched, cached by datasets), each followed by EOS,
    packed into rows of exactly ``seq_len`` tokens: ``input_ids``, ``labels`` (= input_ids) and, with
    ``document_aware``, ``position_ids`` restarting at each document (pass them with attention_mask=None and
    transformers keeps attention inside each document).

    ``source``: one source or several, mixed by their weights (`longctx.data.mixing`), or with ``mix=False`` one
    after the other, unweighted (evaluation). ``split``: None (whole sources), "train" or "validation"
    (`longctx.data.split`). Documents with fewer than ``min_doc_tokens`` tokens (and empty ones) are skipped,
    counted and logged; the final partial row is dropped and its token count logged.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; pretraining packs documents separated by EOS")
    sources = as_sources(source)
    with main_process_first():
        parts = [_documents(s.path, tokenizer, split, text_field, hub_config, hub_split, min_doc_tokens, num_proc,
                            suffixes, skip_bad_rows) for s in sources]
    name = sources[0].path if len(sources) == 1 else f"{len(sources)} sources"
    if len(parts) > 1:
        if not mix:
            docs = pa.concat_arrays(parts)
        else:
            lengths = [p.value_lengths().to_numpy(zero_copy_only=False) + 1 for p in parts]  # + EOS
            picks = mixture(lengths, [s.weight for s in sources], seed)
            log_mixture([s.path for s in sources], lengths, [s.weight for s in sources], picks)
            docs = pa.concat_arrays([p.take(pa.array(k)) for p, k in zip(parts, picks)])
            # one seeded order, so rows mix the sources instead of holding one source each
            docs = docs.take(pa.array(np.random.default_rng(seed).permutation(len(docs))))
    else:
        docs = parts[0]
    n_docs = len(docs)
    total = int(np.sum(docs.value_lengths().to_numpy(zero_copy_only=False))) + n_docs
    if total < seq_len:
        raise DataError(f"{name}: {total} tokens in {n_docs} documents (with EOS) are fewer than one block of "
                        f"seq_len={seq_len}")
    columns, remainder = pack_documents(docs, tokenizer.eos_token_id, seq_len, document_aware)
    columns["labels"] = columns["input_ids"]
    rows = len(columns["input_ids"])
    log.info("%s: packed %d documents, %d tokens (with EOS) into %d rows of %d; dropped the final %d tokens "
             "that do not fill a row", name, n_docs, total, rows, seq_len, remainder)
    return rows_to_dataset(columns)
