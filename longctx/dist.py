"""Distributed facts in one place: rank, world size, this process's device, the main process, a barrier.

torchrun (and SLURM through it) sets RANK / LOCAL_RANK / WORLD_SIZE before anything starts, so they are read from
the environment; once torch.distributed is initialised its answer wins (it is the same unless a launcher lied).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


_ALONE = False  # set by `alone()`


def _initialized() -> bool:
    return not _ALONE and torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def alone():
    """This process works by itself while the others have finished: no collective, no barrier (rank 0's evaluation
    after a torchrun training; a barrier there waited for ranks that had exited, and the run failed)."""
    global _ALONE
    _ALONE = True
    try:
        yield
    finally:
        _ALONE = False


def rank() -> int:
    if _ALONE:
        return 0
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    if _ALONE:
        return 1
    return torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 alone writes files and prints."""
    return rank() == 0


def is_distributed() -> bool:
    """More than one process (launched by torchrun), whether or not torch.distributed is initialised yet."""
    return world_size() > 1 or _initialized()


def local_device() -> torch.device:
    """cuda:<local rank> on a GPU machine, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if _initialized():
        torch.distributed.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process alone and give every rank its result; when it raises, every rank raises the
    same exception (a rank that waited for an answer that never comes would hang in the next collective).

    For decisions only the main process may take, such as claiming the run directory or tidying it before resume.
    """
    if not _initialized() or world_size() == 1:
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as e:  # noqa: BLE001  handed to every rank, then raised on this one too
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001  an exception that cannot travel still must not leave ranks waiting
                e = RuntimeError(f"{type(e).__name__}: {e}")
            box[0] = (False, e)
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
