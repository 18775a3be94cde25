"""Sources: what `data.train` / `data.eval` name, loaded as a `datasets.Dataset` with all its columns.

    load_texts("builtin:python-stdlib", split="validation")           # one string column "text"
    load_texts("repo/", suffixes=[".py", ".md"])                       # a code repository, one document per file

- ``builtin:python-stdlib``: the ``.py`` files of the running interpreter's standard library (test folders
  excluded), one document per file.
- local files: a file, a directory (searched recursively; hidden files and folders skipped, counted) or a glob.
  By default ``.txt`` (one document per file), ``.jsonl``/``.json`` and ``.parquet`` (rows); ``suffixes`` chooses
  others: every suffix except .jsonl/.json/.parquet is read as plain text, one document per file (source code,
  Markdown, ...). One format per source.
- anything else is a Hugging Face hub dataset name (``hub_config``, ``hub_split``).

``split``: None is the whole source; "train" / "validation" its deterministic parts (`longctx.data.split`).
Every problem raises :class:`DataError` naming the file or field and the counts; nothing is dropped silently.
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from longctx.data import split as split_lib
from longctx.data.errors import DataError
from longctx.data.workers import num_proc as _num_proc

log = logging.getLogger(__name__)

STDLIB = "builtin:python-stdlib"
STDLIB_VALIDATION_PERCENT = split_lib.VALIDATION_PERCENT
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STRUCTURED = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Source:
    """One entry of `data.train`: a path (or builtin / hub name) and its weight in the mixture."""

    path: str
    weight: float = 1.0


def as_sources(source: str | Source | Mapping | Sequence) -> list[Source]:
    """`data.train` in any of its forms (a string, {path, weight}, or a list of those) as a list of Source."""
    if isinstance(source, (str, Source, Mapping)):
        source = [source]
    out = []
    for s in source:
        if isinstance(s, str):
            out.append(Source(s))
        elif isinstance(s, Source):
            out.append(s)
        elif isinstance(s, Mapping):
            out.append(Source(str(s["path"]), float(s.get("weight", 1.0))))
        else:
            raise DataError(f"a data source is a path or {{path, weight}}, got {s!r}")
    if not out:
        raise DataError("no data source given")
    return out


def kind_of(path: Path, suffixes: Sequence[str] | None) -> str | None:
    """'text', 'json' or 'parquet' for a file with an accepted suffix, else None."""
    suffix = path.suffix.lower()
    if suffix not in {s.lower() for s in (suffixes or DEFAULT_SUFFIXES)}:
        return None
    return STRUCTURED.get(suffix, "text")


# ----------------------------------------------------------------------------------------------- stdlib


def stdlib_files(split: str | None = "train") -> list[Path]:
    """Sorted ``.py`` files of the interpreter's standard library in ``split`` (None: all; test folders excluded)."""
    if split not in (None, *split_lib.SPLITS):
        raise DataError(f"{STDLIB}: split must be 'train' or 'validation', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if split is None or split_lib.split_of(rel.as_posix()) == split:
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# ------------------------------------------------------------------------------------------ local files


def _scan_directory(root: Path, suffixes: Sequence[str] | None) -> list[Path]:
    """Files under `root` with an accepted suffix; what is left out (hidden, other suffixes) is counted in the log."""
    files, hidden, other = [], 0, Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        hidden += sum(1 for d in dirnames if d.startswith("."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith("."):
                hidden += 1
            elif kind_of(path, suffixes) is None:
                other[path.suffix.lower() or "(none)"] += 1
            else:
                files.append(path)
    if hidden or other:
        common = sorted(other.items(), key=lambda item: (-item[1], item[0]))
        left = ", ".join(f"{n} {s}" for s, n in common[:5]) + (", ..." if len(other) > 5 else "")
        log.info("%s: reading %d files; left out %d hidden files/folders and %d files of other types%s "
                 "(data.suffixes chooses the types: now %s)", root, len(files), hidden, sum(other.values()),
                 f" ({left})" if other else "", ", ".join(suffixes or DEFAULT_SUFFIXES))
    if not files:
        raise DataError(f"empty source: directory {root} has no {'/'.join(suffixes or DEFAULT_SUFFIXES)} files "
                        "(data.suffixes chooses the file types)")
    return files


def local_files(source: str, suffixes: Sequence[str] | None = None) -> list[Path] | None:
    """The files a local source names, sorted; None when ``source`` is not a local path or glob."""
    path = Path(source).expanduser()
    allowed = ", ".join(suffixes or DEFAULT_SUFFIXES)
    if path.is_dir():
        files = _scan_directory(path, suffixes)
    elif path.is_file():
        files = [path]
    elif glob.has_magic(source):
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
        if suffixes:  # the suffixes choose among what the glob matches
            files = [p for p in files if kind_of(p, suffixes)]
        if not files:
            raise DataError(f"empty source: no files match {source}" + (f" (data.suffixes: {allowed})" if suffixes else ""))
    elif kind_of(path, suffixes) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"data file not found: {source}")
    else:
        return None
    bad = [str(p) for p in files if kind_of(p, suffixes) is None]
    if bad:
        raise DataError(f"unsupported file type {bad[0]} ({len(bad)} of {len(files)} files); allowed: {allowed} "
                        "(data.suffixes adds plain-text types such as .py or .md)")
    kinds = {kind_of(p, suffixes) for p in files}
    if len(kinds) > 1:
        raise DataError(f"source {source} mixes formats ({', '.join(sorted(kinds))}); use one format per source")
    return sorted(files)


def check_readable(files: list[Path], skip: bool = False) -> list[Path]:
    """Fail early, naming the file, on unreadable, non-UTF-8 or corrupt files; with `skip`, leave them out (counted)."""
    good, bad = [], []
    for path in files:
        try:
            if path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                pq.read_metadata(path)
            else:
                path.read_bytes().decode("utf-8")
            good.append(path)
            continue
        except UnicodeDecodeError as e:
            problem = f"file {path} is not valid UTF-8 (byte {e.start}: {e.reason})"
        except OSError as e:
            problem = f"cannot read file {path}: {e.strerror or e}"
        except Exception as e:  # pyarrow errors for corrupt parquet
            problem = f"cannot read file {path}: {e}"
        if not skip:
            raise DataError(problem)
        bad.append(problem)
    if bad:
        log.warning("skipped %d of %d files (data.skip_bad_rows): the first: %s", len(bad), len(files), bad[0])
        if not good:
            raise DataError(f"every file is bad: {bad[0]}")
    return good


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Loaded:
    """A loaded source: the rows, a description for messages, and where the rows came from (to name a bad row)."""

    ds: datasets.Dataset
    desc: str
    files: list[Path] | None = None  # local sources
    kind: str = "hub"  # text | json | parquet | hub

    def where(self, index: int) -> str:
        """'FILE row N' (0-based) for a row, or the description for index -1."""
        if index < 0:
            return self.desc
        if self.files is None:
            return f"{self.desc} row {index}"
        if self.kind == "text":
            return str(self.files[index])  # one document per file
        if len(self.files) == 1:
            return f"{self.files[0]} row {index}"
        for path in self.files:  # only on an error: count each file's rows
            n = _load_files(self.kind, [path], str(path)).num_rows
            if index < n:
                return f"{path} row {index}"
            index -= n
        return f"{self.desc} row {index}"


def _load_files(kind: str, files: list[Path], desc: str) -> datasets.Dataset:
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files={"train": [str(f) for f in files]}, split="train", **kwargs)
    except Exception as e:  # malformed json and friends
        cause = e.__cause__ or e
        raise DataError(f"cannot parse {desc} as {kind}: {cause or type(cause).__name__}") from None


def load_raw(source: str, split: str | None = None, hub_config: str | None = None, hub_split: str = "train",
             suffixes: Sequence[str] | None = None, skip_bad_files: bool = False) -> Loaded:
    """A source with all its columns (the stdlib's `split` selects its files; others are split by the caller)."""
    if source.startswith("builtin:"):
        if source != STDLIB:
            raise DataError(f"unknown builtin source {source!r}; available: {STDLIB}")
        files = check_readable(stdlib_files(split), skip_bad_files)
        desc = f"{STDLIB} ({split or 'all'}, {len(files)} files)"
        return Loaded(_load_files("text", files, desc), desc, files, "text")
    files = local_files(source, suffixes)
    if files is not None:
        files = check_readable(files, skip_bad_files)
        kind = kind_of(files[0], suffixes)
        desc = str(files[0]) if len(files) == 1 else f"{source} ({len(files)} files)"
        if kind != "text" and all(f.stat().st_size == 0 for f in files):
            raise DataError(f"empty source: {desc} is empty (0 bytes)")
        return Loaded(_load_files(kind, files, desc), desc, files, kind)
    desc = f"hub dataset {source}" + (f" ({hub_config})" if hub_config else "") + f" split {hub_split}"
    try:
        ds = datasets.load_dataset(source, hub_config, split=hub_split)
    except Exception as e:
        raise DataError(f"cannot load {desc}: {e}") from None
    return Loaded(ds, desc)


def require_string_fields(ds: datasets.Dataset, desc: str, fields: list[str]) -> None:
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


def hold_out(ds: datasets.Dataset, field: str, split: str, desc: str, workers: int | None = None
             ) -> datasets.Dataset:
    """The `split` part of `ds` by the SHA-1 of each row's `field` (`longctx.data.split`), logged."""
    if split not in split_lib.SPLITS:
        raise DataError(f"{desc}: split must be 'train' or 'validation' (or None for the whole source), got {split!r}")
    digests = ds.map(lambda b: {"digest": [split_lib.digest(t) for t in b[field]]}, batched=True,
                     remove_columns=ds.column_names, num_proc=_num_proc(workers, len(ds)),
                     desc="validation split")["digest"]
    held = split_lib.validation_mask(list(digests))
    keep = held if split == "validation" else ~held
    log.info("%s: %s part, %d of %d documents (%d held out for validation by a hash of the text; data.eval is "
             "not set)", desc, split, int(keep.sum()), len(ds), int(held.sum()))
    return ds.select(keep.nonzero()[0])


def load_texts(source: str, split: str | None = None, text_field: str = "text", hub_config: str | None = None,
               hub_split: str = "train", suffixes: Sequence[str] | None = None, skip_bad_files: bool = False,
               num_proc: int | None = None) -> datasets.Dataset:
    """Load a source as a dataset with one string column ``text`` (one document per row).

    ``split``: None for the whole source, "train" or "validation" for its deterministic parts (the stdlib's by file
    path, every other source's by a hash of the text). ``hub_config`` and ``hub_split`` apply to hub datasets.
    ``text_field`` names the column of jsonl/json/parquet/hub rows (plain-text files and the stdlib have ``text``).
    """
    loaded = load_raw(source, split, hub_config, hub_split, suffixes, skip_bad_files)
    ds, desc = loaded.ds, loaded.desc
    require_string_fields(ds, desc, [text_field])
    ds = ds.select_columns([text_field])
    if not pa.compute.max(pa.compute.utf8_length(ds.data.column(text_field))).as_py():
        raise DataError(f"empty source: all {len(ds)} documents in {desc} are empty")
    if split is not None and source != STDLIB:
        ds = hold_out(ds, text_field, split, desc, num_proc)
        if len(ds) == 0:
            raise DataError(f"{desc}: no documents in its {split} part (one document cannot be split); set data.eval")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    log.info("loaded %d documents from %s", len(ds), desc)
    return ds
