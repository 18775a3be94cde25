"""The run directory: every file name and the layout in one place (trainer, evaluate, export, sweep read it here).

    RUN/config.yaml                 the resolved config, every default filled in
    RUN/checkpoint-<step>/          Trainer's checkpoint + trainable_params.safetensors + longctx_config.yaml,
                                    and longctx_complete.json, written last: without it the checkpoint is ignored
    RUN/final/                      adapter (or full weights) + trainable_params.safetensors + tokenizer + longctx.json
    RUN/eval/                       ppl.json|md|png, passkey.json|md|png, ...

    RUN/run.json                    {"run_id": ...}: the run this directory holds (a fresh start makes a new id)
    RUN/longctx.lock                flock'ed by the live run's main process (host, pid inside for messages)
    RUN/superseded/<time>-<id>/     what `train.resume: off` (and a replaced final/) moved out of the way

The checkpoint protocol (README, "Resume and preemption"; tests/test_faults.py breaks each promise on purpose):
- a checkpoint is complete when its marker exists: {step, run_id, files: {path: {size, crc32}}}, written by the
  main process after every rank saved, atomically (temp file + rename); resume verifies every file against it;
- rotation (train.save_total_limit) deletes old checkpoints only after the new one is marked complete, each by a
  rename out of the checkpoint-<step> namespace first, so no kill leaves zero complete checkpoints or a
  half-deleted directory that looks like a checkpoint;
- one live run per directory: the claim is an flock, dropped by the kernel when the process dies.

Plain pathlib and the standard library: the sweep launcher reads run directories without loading a model.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from longctx.config import ConfigError

CONFIG = "config.yaml"  # RUN/config.yaml
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's own naming: checkpoint-<global step>
COMPLETE = "longctx_complete.json"  # in a checkpoint, written last and atomically
CHECKPOINT_CONFIG = "longctx_config.yaml"  # in a checkpoint: the config it was trained with
TRAINABLE = "trainable_params.safetensors"  # the LongLoRA+ embed/norm weights (checkpoint and final/)
FINAL = "final"
INFO = "longctx.json"  # in final/: base model, rope, attention, lengths, the config
EVAL = "eval"
RUN_INFO = "run.json"  # {"run_id", "created"}: the run this directory holds; a fresh start writes a new id
CLAIM = "longctx.lock"  # flock'ed by the live run's main process for its lifetime
SUPERSEDED = "superseded"  # superseded/<time>-<label>/: old checkpoints, final/, eval/ moved out of the way
DELETING = ".deleting"  # checkpoint-<step>.deleting: a checkpoint being deleted (no longer a checkpoint name)
SWEEP_RUNNING = ".sweep_running.json"  # a sweep job's own marker while it runs the run: {host, pids}

_CHECKPOINT = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint-<step> directory name, None for any other name."""
    m = _CHECKPOINT.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(run: Path) -> list[Path]:
    """Every checkpoint-<step> directory of a run, complete or not, oldest first."""
    found = [p for p in Path(run).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    """The marker exists (whether the files still match it is `verify`'s question)."""
    return (Path(checkpoint) / COMPLETE).is_file()


def complete_checkpoints(run: Path) -> list[Path]:
    """checkpoint-<step> directories that finished saving, oldest first."""
    return [p for p in checkpoints(run) if is_complete(p)]


def final_dir(run: Path) -> Path:
    return Path(run) / FINAL


def eval_dir(run: Path) -> Path:
    return Path(run) / EVAL


def info_path(final: Path) -> Path:
    return Path(final) / INFO


def run_info_path(run: Path) -> Path:
    return Path(run) / RUN_INFO


def superseded_dir(run: Path) -> Path:
    return Path(run) / SUPERSEDED


def read_run_id(run: Path) -> str | None:
    """The id of the run this directory holds (RUN/run.json), None when there is none (a new or older directory)."""
    info = read_json(run_info_path(run))
    return info.get("run_id") if isinstance(info, dict) else None


def write_run_id(run: Path, run_id: str) -> None:
    if read_run_id(run) != run_id:
        write_atomic(run_info_path(run), json.dumps({"run_id": run_id, "created": time.time()}))


def read_info(final: Path) -> dict | None:
    """final/longctx.json, None when final/ is missing or incomplete (longctx.json is written last)."""
    info = read_json(info_path(final))
    return info if isinstance(info, dict) else None


def read_json(path: Path):
    """The JSON in a file, None when it is missing or not JSON (a run directory's files may be partly written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The completion marker: the checkpoint's manifest, written last (see "The checkpoint protocol" above)

def file_crc32(path: Path, chunk: int = 8 << 20) -> int:
    """CRC-32 of a file's bytes (zlib releases the GIL on large buffers, so threads hash files in parallel)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _files(checkpoint: Path) -> list[Path]:
    """Every file under a checkpoint (DeepSpeed's subdirectories too) but the marker and its temp file, sorted."""
    return sorted(p for p in Path(checkpoint).rglob("*") if p.is_file() and p.name not in (COMPLETE, COMPLETE + ".tmp"))


def _crc32s(paths: list[Path]) -> list[int]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_crc32, paths))


def manifest(checkpoint: Path) -> dict[str, dict[str, int]]:
    """{relative path: {size, crc32}} of every file of a checkpoint. CRC-32 rather than a cryptographic hash: it
    guards against torn and corrupted writes, not against an adversary, and it is the cheapest check that reads
    every byte (about 1 GiB/s per core, files hashed in parallel threads)."""
    checkpoint = Path(checkpoint)
    files = _files(checkpoint)
    return {p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "crc32": crc}
            for p, crc in zip(files, _crc32s(files))}


def write_complete(checkpoint: Path, step: int, run_id: str) -> None:
    """Mark a checkpoint complete: its manifest, step and run id, and the marker's own CRC (so a corrupted marker
    is named as such), written atomically (temp file + rename)."""
    marker = {"step": step, "run_id": run_id, "time": time.time(), "files": manifest(checkpoint)}
    write_atomic(Path(checkpoint) / COMPLETE, json.dumps({**marker, "crc32": _marker_crc(marker)}, indent=1))


def _marker_crc(marker: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in marker.items() if k != "crc32"}, sort_keys=True).encode())


def read_complete(checkpoint: Path) -> dict | None:
    """The completion marker, or None when there is none or it is unreadable (then the checkpoint is incomplete)."""
    marker = read_json(Path(checkpoint) / COMPLETE)
    return marker if isinstance(marker, dict) else None


def verify(checkpoint: Path) -> str | None:
    """None when every file of the marker's manifest is there with its size and CRC and no other file is; else
    what is wrong, naming the file."""
    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        return f"no {COMPLETE} (a save that did not finish)"
    marker = read_complete(checkpoint)
    if marker is None:
        return f"{COMPLETE} is unreadable (truncated or not JSON)"
    files = marker.get("files")
    if not isinstance(files, dict):
        return f"{COMPLETE} has no manifest of the checkpoint's files (written by an older longctx)"
    if marker.get("crc32") != _marker_crc(marker):
        return f"{COMPLETE} does not match its own checksum (corrupted)"
    for name, want in sorted(files.items()):  # sizes first: cheap, and they catch truncation
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return (f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('size')} (truncated or "
                    "rewritten)")
    names = sorted(files)
    for name, crc in zip(names, _crc32s([checkpoint / n for n in names])):
        if crc != files[name].get("crc32"):
            return f"{name} does not match its checksum (corrupted or rewritten)"
    extra = sorted({p.relative_to(checkpoint).as_posix() for p in _files(checkpoint)} - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest (a file of another save)"
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temp file, flushed to disk, renamed over the target."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Removing and setting aside

def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint so that no kill leaves a directory that looks like one: rename it out of the
    checkpoint-<step> namespace first (atomic), then delete; a leftover *.deleting is removed at the next start."""
    checkpoint = Path(checkpoint)
    doomed = checkpoint.with_name(checkpoint.name + DELETING)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def remove_leftovers(run: Path) -> list[str]:
    """Remove what killed saves and killed deletions left behind: checkpoint directories without a marker and
    *.deleting directories. Only under the run's claim (nothing else writes there). Their names."""
    gone = []
    for p in sorted(Path(run).glob(f"{CHECKPOINT_PREFIX}*{DELETING}")):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    for p in checkpoints(run):
        if not is_complete(p):
            remove_checkpoint(p)
            gone.append(p.name)
    return gone


def rotate(run: Path, keep: int) -> list[str]:
    """Keep the `keep` (>= 1) newest complete checkpoints, delete older ones; called after a new checkpoint is marked
    complete, so the newest complete checkpoint always survives. The deleted names."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    doomed = complete_checkpoints(run)[:-keep]
    for p in doomed:
        remove_checkpoint(p)
    return [p.name for p in doomed]


def set_aside(run: Path, paths: list[Path], label: str) -> Path:
    """Move `paths` (entries of the run directory) into RUN/superseded/<time>-<label>/ (renames: nothing copied,
    nothing lost); that directory."""
    base = superseded_dir(run) / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    for p in paths:
        os.replace(p, dest / Path(p).name)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# The claim: one live run per run directory

_claims: dict[Path, int] = {}  # run directory (resolved) -> the open, flock'ed file descriptor of RUN/longctx.lock


def claim(run: Path, wait_s: float = 2.0) -> None:
    """Take the run directory for this process until it exits (or `release`); ConfigError naming the directory
    and the holder when another live process has it. Re-entrant within a process.

    An flock on RUN/longctx.lock, held through an open descriptor: the kernel drops it when the process dies,
    however it dies, so a crash never leaves a stale claim (the file's text, host and pid, is only for the message).
    A probe such as `holder()` holds the lock for microseconds, so a refused attempt retries for `wait_s`."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"train.output_dir: {run} exists and is not a directory")
    key = run.resolve()
    if key in _claims:
        return
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / CLAIM, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot write to {run}: {e.strerror or e}") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            who = _read_claim(fd)
            os.close(fd)
            raise ConfigError(f"train.output_dir: {run} is in use by another run ({who}); one live run per run "
                              "directory: wait for it to finish, stop it, or choose another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode(), 0)
    _claims[key] = fd


def release(run: Path) -> None:
    """Give the run directory back (the process's exit does the same)."""
    fd = _claims.pop(Path(run).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def holder(run: Path) -> str | None:
    """'host H, pid P' of the live process that has claimed the run directory, None when none has (this process
    included: it answers for others)."""
    path = Path(run) / CLAIM
    if Path(run).resolve() in _claims or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it (our shared lock goes with the descriptor)
    except OSError:
        return _read_claim(fd)
    finally:
        os.close(fd)


def _read_claim(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {info['host']}, pid {info['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"
