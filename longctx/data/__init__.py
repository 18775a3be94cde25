"""Data: sources -> packed token rows for pretraining, or chat/instruction SFT rows with only the answers trained.

    from longctx.data import build_pretrain_dataset, build_sft_dataset, DataCollator
    train = build_pretrain_dataset("builtin:python-stdlib", tokenizer, 1024, split="train")
    train = build_sft_dataset("chats.jsonl", tokenizer, 16384)                  # data.format: sft

One idea a file: `sources` (what a source names, loading), `split` (the deterministic validation split),
`pretrain` (documents -> packed blocks), `conversations` (SFT row formats), `templates` (chat templates and the
assistant spans), `sft` (SFT examples: masking, overlong rows, packing), `packing`, `mixing` (weighted sources),
`collate` (batches), `errors` (DataError and bad rows), `workers` (datasets.map processes).

Every problem with the data raises :class:`DataError` naming the file or field (and row) and the counts; nothing is
dropped silently: skipped documents or rows, cut conversations and the packing remainder are counted in the log.
"""

# Every name importable from the former single-file longctx/data.py still is.
from longctx.data.collate import DataCollator, collate
from longctx.data.conversations import ROLES, conversation
from longctx.data.errors import DataError
from longctx.data.mixing import mixture
from longctx.data.packing import IGNORE, best_fit, pack_documents, pack_examples, rows_to_dataset
from longctx.data.pretrain import build_pretrain_dataset, tokenize_documents
from longctx.data.sft import OVERLONG, TRAIN_ON, build_sft_dataset
from longctx.data.sources import (DEFAULT_SUFFIXES, STDLIB, STDLIB_VALIDATION_PERCENT, Source, as_sources,
                                  load_raw, load_texts, local_files, stdlib_files)
from longctx.data.split import VALIDATION_PERCENT, split_of, validation_mask
from longctx.data.templates import DEFAULT_PROMPT, TEMPLATE_NAMES, TEMPLATES, Renderer, assistant_spans
from longctx.data.workers import main_process_first

__all__ = ["DEFAULT_PROMPT", "DEFAULT_SUFFIXES", "IGNORE", "OVERLONG", "ROLES", "STDLIB", "STDLIB_VALIDATION_PERCENT",
           "TEMPLATES", "TEMPLATE_NAMES", "TRAIN_ON", "VALIDATION_PERCENT", "DataCollator", "DataError", "Renderer",
           "Source", "as_sources", "assistant_spans", "best_fit", "build_pretrain_dataset", "build_sft_dataset",
           "collate", "conversation", "load_raw", "load_texts", "local_files", "main_process_first", "mixture",
           "pack_documents", "pack_examples", "rows_to_dataset", "split_of", "stdlib_files", "tokenize_documents",
           "validation_mask"]
