"""Data: sources -> token blocks (pretraining) or masked prompt/response rows (SFT).

Sources
- ``builtin:python-stdlib``: the ``.py`` files of the running interpreter's standard library (test folders
  excluded), one document per file, split into ``train``/``validation`` by a hash of the relative path.
- local files: ``.txt`` (one document per file), ``.jsonl``/``.json``, ``.parquet``; a file, a directory
  (searched recursively) or a glob. One format per source.
- anything else is a Hugging Face hub dataset name (``hub_config``, ``hub_split``).

Every problem with the data raises :class:`DataError` naming the file or field and the counts. Nothing is
dropped silently: skipped documents and the packing remainder are counted and logged.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch

log = logging.getLogger(__name__)

STDLIB = "builtin:python-stdlib"
STDLIB_VALIDATION_PERCENT = 5
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the file or field and the counts."""


# ----------------------------------------------------------------------------------------------- sources


def stdlib_split_of(relpath: str) -> str:
    """Deterministic split of a stdlib file: ~5% of relative paths (by SHA-1) go to validation."""
    digest = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16)
    return "validation" if digest % 100 < STDLIB_VALIDATION_PERCENT else "train"


def stdlib_files(split: str = "train") -> list[Path]:
    """Sorted ``.py`` files of the interpreter's standard library in ``split`` (test folders excluded)."""
    if split not in ("train", "validation"):
        raise DataError(f"{STDLIB}: split must be 'train' or 'validation', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if stdlib_split_of(rel.as_posix()) == split:
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, sorted; None when ``source`` is not a local path or glob."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FORMATS]
        if not files:
            raise DataError(f"empty source: directory {source} has no {'/'.join(_FORMATS)} files")
    elif path.is_file():
        files = [path]
    elif glob.has_magic(source):
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
        if not files:
            raise DataError(f"empty source: no files match {source}")
    elif path.suffix.lower() in _FORMATS or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"data file not found: {source}")
    else:
        return None
    bad = [str(p) for p in files if p.suffix.lower() not in _FORMATS]
    if bad:
        raise DataError(f"unsupported file type {bad[0]} ({len(bad)} of {len(files)} files); "
                        f"allowed: {', '.join(_FORMATS)}")
    kinds = {_FORMATS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"source {source} mixes formats ({', '.join(sorted(kinds))}); use one format per source")
    return sorted(files)


def _check_readable(files: list[Path]) -> None:
    """Fail early, naming the file, on unreadable, non-UTF-8 or corrupt files."""
    for path in files:
        try:
            if path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                pq.read_metadata(path)
            else:
                path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"file {path} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise DataError(f"cannot read file {path}: {e.strerror or e}") from None
        except Exception as e:  # pyarrow errors for corrupt parquet
            raise DataError(f"cannot read file {path}: {e}") from None


def _load_raw(source: str, split: str = "train", hub_config: str | None = None,
              hub_split: str = "train") -> tuple[datasets.Dataset, str]:
    """Load a source with all its columns; returns (dataset, a description for messages)."""
    if source.startswith("builtin:"):
        if source != STDLIB:
            raise DataError(f"unknown builtin source {source!r}; available: {STDLIB}")
        files = stdlib_files(split)
        _check_readable(files)
        desc = f"{STDLIB} ({split}, {len(files)} files)"
        ds = datasets.load_dataset("text", data_files={split: [str(f) for f in files]},
                                   sample_by="document", split=split)
        return ds, desc
    files = _local_files(source)
    if files is not None:
        _check_readable(files)
        kind = _FORMATS[files[0].suffix.lower()]
        desc = str(files[0]) if len(files) == 1 else f"{source} ({len(files)} files)"
        if kind != "text" and all(f.stat().st_size == 0 for f in files):
            raise DataError(f"empty source: {desc} is empty (0 bytes)")
        kwargs = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files={"train": [str(f) for f in files]}, split="train",
                                       **kwargs)
        except Exception as e:  # malformed json and friends
            cause = e.__cause__ or e
            raise DataError(f"cannot parse {desc} as {kind}: {cause or type(cause).__name__}") from None
        return ds, desc
    desc = f"hub dataset {source}" + (f" ({hub_config})" if hub_config else "") + f" split {hub_split}"
    try:
        ds = datasets.load_dataset(source, hub_config, split=hub_split)
    except Exception as e:
        raise DataError(f"cannot load {desc}: {e}") from None
    return ds, desc


def _require_string_fields(ds: datasets.Dataset, desc: str, fields: list[str]) -> None:
    if len(ds) == 0:
        raise DataError(f"empty source: {desc} has 0 rows")
    for field in fields:
        if field not in ds.column_names:
            raise DataError(f"{desc}: missing field {field!r} (available: {', '.join(ds.column_names)})")
        feature = ds.features[field]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"{desc}: field {field!r} must hold strings, found {feature}")
        nulls = ds.data.column(field).null_count
        if nulls:
            raise DataError(f"{desc}: field {field!r} is null in {nulls} of {len(ds)} rows")


def load_texts(source: str, split: str = "train", text_field: str = "text", hub_config: str | None = None,
               hub_split: str = "train") -> datasets.Dataset:
    """Load a source as a dataset with one string column ``text`` (one document per row).

    ``split`` selects the part of ``builtin:python-stdlib`` (``train``/``validation``); ``hub_config`` and
    ``hub_split`` apply to hub datasets; a local source is loaded whole. ``text_field`` names the column of
    jsonl/json/parquet/hub rows (.txt files and the stdlib have ``text``).
    """
    ds, desc = _load_raw(source, split, hub_config, hub_split)
    _require_string_fields(ds, desc, [text_field])
    ds = ds.select_columns([text_field])
    if not pa.compute.max(pa.compute.utf8_length(ds.data.column(text_field))).as_py():
        raise DataError(f"empty source: all {len(ds)} documents in {desc} are empty")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    log.info("loaded %d documents from %s", len(ds), desc)
    return ds


# ------------------------------------------------------------------------------------------ preparation


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _num_proc(requested: int | None, rows: int) -> int | None:
    """Worker processes for ``datasets.map``: the request (default: all cores), bounded by the cores and by
    the rows (at least 64 per process); None means in-process."""
    n = min(requested or _cores(), _cores(), max(1, rows // 64))
    return n if n > 1 else None


@contextlib.contextmanager
def main_process_first():
    """Under torchrun the main process prepares (and fills the datasets cache) while the others wait, then
    they reuse the cache. A no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
            torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield
    else:
        yield


def _tokenize_documents(texts: datasets.Dataset, tokenizer, num_proc: int | None) -> datasets.Dataset:
    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    return texts.map(tokenize, batched=True, remove_columns=texts.column_names,
                     num_proc=_num_proc(num_proc, len(texts)), desc="tokenize")


def pack_documents(docs: list[np.ndarray] | pa.ListArray, eos_token_id: int, seq_len: int,
                   document_aware: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of exactly ``seq_len``.

    Returns (columns, remainder): ``input_ids`` of shape (rows, seq_len), and with ``document_aware``
    ``position_ids`` that restart at 0 at each document start and at each row start (a document cut by a
    row boundary continues as a new sequence). The last ``remainder`` tokens (< seq_len) do not fill a row
    and are not used; every other token appears exactly once, in order.
    """
    if isinstance(docs, (pa.ListArray, pa.LargeListArray, pa.ChunkedArray)):
        docs = pa.chunked_array([docs]) if not isinstance(docs, pa.ChunkedArray) else docs
        docs = docs.combine_chunks()
        lengths = docs.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        flat = docs.flatten().to_numpy(zero_copy_only=False)
    else:
        lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
        flat = np.concatenate([np.asarray(d) for d in docs]) if len(docs) else np.zeros(0, np.int64)
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


def _rows_to_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    arrays, fields = [], []
    for name, matrix in columns.items():
        rows, width = matrix.shape
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), width))
        fields.append(name)
    return datasets.Dataset(pa.Table.from_arrays(arrays, names=fields))


def build_pretrain_dataset(source: str, tokenizer, seq_len: int, split: str = "train", text_field: str = "text",
                           hub_config: str | None = None, hub_split: str = "train", min_doc_tokens: int = 0,
                           document_aware: bool = False, num_proc: int | None = None) -> datasets.Dataset:
    """LongLoRA pretraining rows: documents tokenized (batched, cached by datasets), each followed by EOS,
    packed into rows of exactly ``seq_len`` tokens: ``input_ids``, ``labels`` (= input_ids) and, with
    ``document_aware``, ``position_ids`` restarting at each document (pass them with attention_mask=None and
    transformers keeps attention inside each document).

    Documents with fewer than ``min_doc_tokens`` tokens (and empty ones) are skipped, counted and logged;
    the final partial row is dropped and its token count logged.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; pretraining packs documents separated by EOS")
    with main_process_first():
        texts = load_texts(source, split, text_field, hub_config, hub_split)
        tokens = _tokenize_documents(texts, tokenizer, num_proc)
    docs = tokens.data.column("input_ids").combine_chunks()
    lengths = docs.value_lengths().to_numpy(zero_copy_only=False)
    keep = lengths >= max(1, min_doc_tokens)
    skipped = int((~keep).sum())
    if skipped:
        why = f"with fewer than {min_doc_tokens} tokens" if min_doc_tokens > 1 else "that are empty"
        log.warning("%s: skipped %d of %d documents %s (%d tokens in all)", source, skipped, len(lengths), why,
                    int(lengths[~keep].sum()))
        docs = docs.filter(pa.array(keep))
    total = int(lengths[keep].sum()) + int(keep.sum())
    if total < seq_len:
        raise DataError(f"{source}: {total} tokens in {int(keep.sum())} documents (with EOS; {skipped} skipped) "
                        f"are fewer than one block of seq_len={seq_len}")
    columns, remainder = pack_documents(docs, tokenizer.eos_token_id, seq_len, document_aware)
    columns["labels"] = columns["input_ids"]
    rows = len(columns["input_ids"])
    log.info("%s: packed %d documents, %d tokens (with EOS) into %d rows of %d; dropped the final %d tokens "
             "that do not fill a row", source, int(keep.sum()), total, rows, seq_len, remainder)
    return _rows_to_dataset(columns)


def build_sft_dataset(source: str, tokenizer, seq_len: int,
                      prompt_template: str = "[INST] {instruction}{input} [/INST]", split: str = "train",
                      num_proc: int | None = None) -> datasets.Dataset:
    """LongAlpaca SFT rows from ``instruction``, optional ``input``, ``output`` fields.

    The prompt is ``prompt_template`` with ``{instruction}`` and ``{input}`` (replaced by a newline + the
    input when it is non-empty, else by nothing), tokenized with the tokenizer's special tokens (BOS); the
    response is ``output`` + EOS. Prompt tokens get label -100. Responses are truncated so that rows fit
    ``seq_len`` (counted and logged); a prompt that leaves no room for a response token is an error.
    ``split`` is the hub split (local files are loaded whole).
    """
    if "{instruction}" not in prompt_template:
        raise DataError(f"prompt_template must contain {{instruction}}: {prompt_template!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; SFT responses end with EOS")
    if source.startswith("builtin:"):
        raise DataError(f"{source} has no instruction/output fields; SFT needs a jsonl/json/parquet or hub source")
    with main_process_first():
        ds, desc = _load_raw(source, split, None, split)
        _require_string_fields(ds, desc, ["instruction", "output"])
        has_input = "input" in ds.column_names
        if has_input and ds.features["input"] != datasets.Value("string"):
            raise DataError(f"{desc}: field 'input' must hold strings, found {ds.features['input']}")
        eos = tokenizer.eos_token_id

        def tokenize(batch):
            n = len(batch["instruction"])
            inputs = batch["input"] if has_input else [None] * n
            prompts = [prompt_template.format(instruction=ins, input=f"\n{inp}" if inp else "")
                       for ins, inp in zip(batch["instruction"], inputs)]
            prompt_ids = tokenizer(prompts, verbose=False)["input_ids"]
            output_ids = tokenizer(batch["output"], add_special_tokens=False, verbose=False)["input_ids"]
            rows = {"input_ids": [], "labels": [], "prompt_len": [], "full_len": []}
            for p, o in zip(prompt_ids, output_ids):
                full = p + o + [eos]
                rows["input_ids"].append(full[:seq_len])
                rows["labels"].append(([-100] * len(p) + o + [eos])[:seq_len])
                rows["prompt_len"].append(len(p))
                rows["full_len"].append(len(full))
            return rows

        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                    num_proc=_num_proc(num_proc, len(ds)), desc="tokenize sft")
    prompt_len = np.asarray(ds["prompt_len"])
    full_len = np.asarray(ds["full_len"])
    too_long = np.flatnonzero(prompt_len >= seq_len)
    if len(too_long):
        worst = int(too_long[np.argmax(prompt_len[too_long])])
        raise DataError(f"{desc}: {len(too_long)} of {len(ds)} prompts have >= seq_len={seq_len} tokens and leave "
                        f"no room for the response (longest: row {worst}, {int(prompt_len[worst])} tokens)")
    truncated = int((full_len > seq_len).sum())
    if truncated:
        log.warning("%s: truncated the response of %d of %d examples to fit seq_len=%d (%d tokens cut)",
                    desc, truncated, len(ds), seq_len, int(np.maximum(full_len - seq_len, 0).sum()))
    log.info("%s: %d SFT examples, %d tokens, %d of them response tokens", desc, len(ds),
             int(np.minimum(full_len, seq_len).sum()), int((np.minimum(full_len, seq_len) - prompt_len).sum()))
    return ds.remove_columns(["prompt_len", "full_len"])


# -------------------------------------------------------------------------------------------- batching


def collate(features: list[dict], pad_token_id: int | None, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Batch rows for a causal LM.

    Rows with ``position_ids`` (document-aware packing) are stacked with their position_ids and no
    attention_mask, so transformers keeps attention inside each document. Other rows are right-padded to the
    longest row (rounded up to ``pad_to_multiple_of``): input_ids with ``pad_token_id``, labels with -100,
    attention_mask 1 on tokens and 0 on padding; rows of equal length are stacked as they are.
    """
    if not features:
        raise ValueError("collate: empty batch")
    if "position_ids" in features[0]:
        return {key: torch.tensor([f[key] for f in features], dtype=torch.long)
                for key in ("input_ids", "labels", "position_ids")}
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if width != min(lengths) and pad_token_id is None:
        raise ValueError("collate: rows have different lengths but pad_token_id is None")
    input_ids = torch.full((len(features), width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = lengths[i]
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = torch.as_tensor(f.get("labels", f["input_ids"]))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class DataCollator:
    """``collate`` as a callable for ``Trainer(data_collator=...)``."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id, self.pad_to_multiple_of)
