"""SFT examples: conversations rendered with a chat template, the assistant's tokens trained, packed into rows.

    build_sft_dataset("chats.jsonl", tokenizer, 16384)                              # data.format: sft
    build_sft_dataset([{"path": "long.jsonl", "weight": 0.7}, {"path": "short.jsonl", "weight": 0.3}], tokenizer,
                      32768, template="llama2", overlong="truncate_left", seed=42)

Each row (`longctx.data.conversations`) becomes one example: a conversation is rendered with the template
(`longctx.data.templates`) and tokenized once, as the model will see it at inference (the tokenizer's own
`apply_chat_template` gives the same ids); labels are -100 except on the assistant turns (their end-of-turn token
included) or, with ``train_on="all"``, on every token. A plain document is its tokens + EOS, all trained, cut into
pieces of ``seq_len`` (documents are not answers: nothing to protect).

A conversation longer than ``seq_len`` (``overlong``): ``drop`` (the default: a cut answer, or a cut end-of-turn
token, trains the model on what it must not learn, and a cut context trains it to answer from what it has not
seen: LLaMA-Factory #3995, maxtext #4406), ``truncate_left`` (keep the end: the answers, losing the start of the
context), ``truncate_right`` (keep the start, losing the end of the answer) or ``error``. Every affected row is
counted in the log, with how many trained tokens were lost; rows left without a trained token are dropped and
counted. The log also reports tokens per example (min/median/p95/max) and how many tokens are trained.

With ``pack`` (the default) examples are packed by best-fit into rows of exactly ``seq_len`` with position_ids
restarting per example (`longctx.data.packing`): attention never crosses examples and the loss of a row is the loss
of its examples, each alone. Without it, one example per row, padded by the collator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longctx.data.conversations import conversation
from longctx.data.errors import BAD, DataError, drop_bad_rows
from longctx.data.mixing import log_mixture, mixture
from longctx.data.packing import IGNORE, pack_examples, rows_to_dataset
from longctx.data.sources import STDLIB, Loaded, as_sources, load_raw
from longctx.data.templates import DEFAULT_PROMPT, BadRow, Renderer, assistant_spans
from longctx.data.workers import main_process_first, num_proc as _num_proc

log = logging.getLogger(__name__)

OVERLONG = ("drop", "truncate_left", "truncate_right", "error")
# the Encoder's columns, typed (a batch of only bad rows would otherwise infer lists of null)
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
    BAD: datasets.Value("string"), "row": datasets.Value("int64"), "kind": datasets.Value("string"),
    "full": datasets.Value("int64"), "cut": datasets.Value("int64"), "cut_trained": datasets.Value("int64")})
TRAIN_ON = ("assistant", "all")


class Encoder:
    """The `datasets.map` function (batched, with indices): rows -> examples with their bookkeeping columns.

    Columns: input_ids, labels, `BAD` ("" or why the row is bad), row (its index in the source), kind (chat | text),
    full (the conversation's tokens before any cut), cut (tokens cut or, for drop/error, not kept), cut_trained.
    """

    def __init__(self, tokenizer, render: Renderer, seq_len: int, train_on: str, overlong: str, text_field: str):
        self.tokenizer, self.render, self.seq_len = tokenizer, render, seq_len
        self.train_on, self.overlong, self.text_field = train_on, overlong, text_field

    def _parse(self, row: dict) -> tuple[str, str, list[tuple[int, int]] | None]:
        kind, value = conversation(row, self.text_field)
        if kind == "text":
            return kind, value, None
        if self.train_on == "assistant" and not any(m["role"] == "assistant" for m in value):
            raise BadRow("no assistant message", "nothing to train with data.train_on: assistant")
        text, spans = assistant_spans(value, self.render)
        return kind, text, spans

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        out = {k: [] for k in ("input_ids", "labels", BAD, "row", "kind", "full", "cut", "cut_trained")}

        def emit(row, kind, ids=(), labels=(), bad="", full=0, cut=0, cut_trained=0):
            for key, value in zip(out, (list(ids), list(labels), bad, row, kind, full, cut, cut_trained)):
                out[key].append(value)

        parsed = []
        for j, row in enumerate(indices):
            try:
                parsed.append((row, *self._parse({k: v[j] for k, v in batch.items()})))
            except BadRow as e:
                emit(row, "bad", bad=str(e))
        offsets = self.train_on == "assistant"
        if not parsed:  # every row of the batch is bad (transformers cannot encode an empty list)
            return out
        enc = self.tokenizer([text for _, _, text, _ in parsed], add_special_tokens=False,
                             return_offsets_mapping=offsets, verbose=False)
        S, eos = self.seq_len, self.tokenizer.eos_token_id
        for k, (row, kind, text, spans) in enumerate(parsed):
            ids = np.asarray(enc["input_ids"][k], dtype=np.int64)
            if kind == "text":  # a document: + EOS, all trained, in pieces of seq_len; an empty one is counted later
                ids = np.append(ids, eos) if len(ids) else ids
                for at in range(0, max(len(ids), 1), S):
                    emit(row, kind, ids[at:at + S], ids[at:at + S], full=len(ids))
                continue
            trained = np.ones(len(ids), dtype=bool)
            if offsets:
                starts = np.asarray([a for a, _ in enc["offset_mapping"][k]], dtype=np.int64).reshape(-1)
                trained = np.zeros(len(ids), dtype=bool)
                for a, b in spans:
                    trained |= (starts >= a) & (starts < b)
            labels = np.where(trained, ids, IGNORE)
            n = len(ids)
            if n <= S:
                emit(row, kind, ids, labels, full=n)
            elif self.overlong in ("drop", "error"):
                emit(row, kind, full=n, cut=n, cut_trained=int(trained[1:].sum()))
            elif self.overlong == "truncate_right":
                emit(row, kind, ids[:S], labels[:S], full=n, cut=n - S, cut_trained=int(trained[S:].sum()))
            else:  # truncate_left: the kept first token is no longer predicted either
                emit(row, kind, ids[n - S:], labels[n - S:], full=n, cut=n - S,
                     cut_trained=int(trained[1:n - S + 1].sum()))
        return out


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _trained(labels: pa.ChunkedArray) -> np.ndarray:
    """Trained tokens per example: labels != IGNORE after the first token (nothing in the example predicts it)."""
    labels = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    out = np.zeros(len(labels), dtype=np.int64)
    flat = pc.list_flatten(labels).to_numpy()
    parents = pc.list_parent_indices(labels).to_numpy()
    first = np.concatenate([[True], parents[1:] != parents[:-1]]) if len(parents) else np.zeros(0, bool)
    np.add.at(out, parents[(flat != IGNORE) & ~first], 1)
    return out


def _keep(table: pa.Table, keep: np.ndarray) -> pa.Table:
    return table.filter(pa.array(keep)) if not keep.all() else table


def _examples(loaded: Loaded, encoder: Encoder, skip_bad_rows: bool, num_proc: int | None) -> pa.Table:
    """One source's examples: mapped, bad rows and overlong conversations handled, each step counted."""
    ds, desc, S = loaded.ds, loaded.desc, encoder.seq_len
    if len(ds) == 0:
        raise DataError(f"empty source: {desc} has 0 rows")
    mapped = ds.map(encoder, batched=True, with_indices=True, remove_columns=ds.column_names, features=FEATURES,
                    num_proc=_num_proc(num_proc, len(ds)), desc="tokenize sft")
    table = mapped.data.table
    rows = _column(table, "row")
    table = drop_bad_rows(table, lambda i: loaded.where(int(rows[i])) if i >= 0 else desc, skip_bad_rows)
    kind, full = table.column("kind").to_pylist(), _column(table, "full")
    is_text = np.asarray([k == "text" for k in kind], dtype=bool)
    if is_text.any():
        empty = is_text & (full == 0)
        pieces = is_text & (full > S)
        if empty.any():
            log.warning("%s: skipped %d empty documents", desc, int(empty.sum()))
        if pieces.any():
            log.info("%s: cut %d documents longer than seq_len=%d into pieces of %d tokens", desc,
                     len(np.unique(_column(table, "row")[pieces])), S, S)
        table, is_text, full = _keep(table, ~empty), is_text[~empty], full[~empty]
    over = ~is_text & (full > S)
    if over.any():
        first = int(np.flatnonzero(over)[0])
        cut, cut_trained = _column(table, "cut")[over], _column(table, "cut_trained")[over]
        what = (f"{int(over.sum())} of {int((~is_text).sum())} conversations are longer than seq_len={S} tokens "
                f"(longest {int(full[over].max())})")
        if encoder.overlong == "error":
            raise DataError(f"{loaded.where(int(_column(table, 'row')[first]))}: {int(full[first])} tokens, more "
                            f"than seq_len={S}; {what} (data.overlong: drop | truncate_left | truncate_right)")
        if encoder.overlong == "drop":
            log.warning("%s: %s: dropped them, %d tokens, %d of them trained (data.overlong: drop)", desc, what,
                        int(cut.sum()), int(cut_trained.sum()))
            table = _keep(table, ~over)
        else:
            log.warning("%s: %s: cut each to its %s %d tokens (data.overlong: %s), %d tokens in all; %d of them lost "
                        "%d trained tokens", desc, what, "last" if encoder.overlong == "truncate_left" else "first",
                        S, encoder.overlong, int(cut.sum()), int((cut_trained > 0).sum()), int(cut_trained.sum()))
    nothing = _trained(table.column("labels")) == 0
    if nothing.any():
        log.warning("%s: dropped %d examples with no trained token left (answers cut away, or one-token "
                    "documents)", desc, int(nothing.sum()))
        table = _keep(table, ~nothing)
    if table.num_rows == 0:
        raise DataError(f"{desc}: no example left to train on (see the counts above)")
    return table.select(["input_ids", "labels"])


def report(name: str, table: pa.Table) -> None:
    """Tokens per example (min/median/p95/max) and tokens trained, in the log."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    trained = int(_trained(table.column("labels")).sum())
    p = np.percentile(lengths, [50, 95])
    log.info("%s: %d examples; tokens per example min %d / median %d / p95 %d / max %d; %d tokens, %d trained "
             "(%.1f%%)", name, len(lengths), lengths.min(), p[0], p[1], lengths.max(), int(lengths.sum()), trained,
             100 * trained / max(1, int(lengths.sum())))


def build_sft_dataset(source, tokenizer, seq_len: int, prompt_template: str = DEFAULT_PROMPT,
                      template: str = "auto", train_on: str = "assistant", overlong: str = "drop", pack: bool = True,
                      skip_bad_rows: bool = False, text_field: str = "text", hub_config: str | None = None,
                      hub_split: str = "train", suffixes: Sequence[str] | None = None, seed: int = 0,
                      num_proc: int | None = None) -> datasets.Dataset:
    """SFT rows from one source or several with weights (`longctx.data.mixing`), as the module doc describes:
    ``input_ids``, ``labels`` and, packed, ``position_ids``; rows of exactly ``seq_len`` when packed."""
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on: must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong: must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    if train_on == "assistant" and not getattr(tokenizer, "is_fast", False):
        raise DataError("data.train_on: assistant needs a fast tokenizer (character offsets); this one is "
                        f"{type(tokenizer).__name__}")
    render = Renderer.for_tokenizer(tokenizer, template, prompt_template)
    encoder = Encoder(tokenizer, render, seq_len, train_on, overlong, text_field)
    sources = as_sources(source)
    log.info("sft: template %r%s, train on %s tokens, overlong rows: %s", render.name,
             " (auto: the tokenizer's own)" if template == "auto" and render.name == "tokenizer" else
             " (auto: the tokenizer has no chat template)" if template == "auto" else "", train_on, overlong)
    with main_process_first():
        parts = []
        for s in sources:
            if s.path == STDLIB:
                raise DataError(f"{STDLIB} holds documents, not conversations: use it with data.format: pretrain")
            loaded = load_raw(s.path, None, hub_config, hub_split, suffixes, skip_bad_rows)
            parts.append(_examples(loaded, encoder, skip_bad_rows, num_proc))
    name = sources[0].path if len(sources) == 1 else f"{len(sources)} sources"
    if len(parts) > 1:
        lengths = [pc.list_value_length(t.column("input_ids")).to_numpy() for t in parts]
        picks = mixture(lengths, [s.weight for s in sources], seed)
        log_mixture([s.path for s in sources], lengths, [s.weight for s in sources], picks)
        table = pa.concat_tables([t.take(pa.array(k)) for t, k in zip(parts, picks)], promote_options="permissive")
    else:
        table = parts[0]
    report(name, table)
    if not pack:
        return datasets.Dataset(table)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    columns = pack_examples(table.column("input_ids"), table.column("labels"), seq_len, pad)
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    rows = len(columns["input_ids"])
    log.info("%s: packed %d examples into %d rows of %d tokens (%.1f%% padding); position_ids restart per example",
             name, table.num_rows, rows, seq_len, 100 * (1 - tokens / (rows * seq_len)))
    return rows_to_dataset(columns)
