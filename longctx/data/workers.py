"""Processes for data preparation: how many `datasets.map` workers, and the main process first under torchrun."""

from __future__ import annotations

import contextlib
import os

from longctx import dist


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def num_proc(requested: int | None, rows: int) -> int | None:
    """Worker processes for ``datasets.map``: the request (default: all cores), bounded by the cores and by
    the rows (at least 64 per process); None means in-process."""
    n = min(requested or cpu_cores(), cpu_cores(), max(1, rows // 64))
    return n if n > 1 else None


@contextlib.contextmanager
def main_process_first():
    """Under torchrun the main process prepares (and fills the datasets cache) while the others wait, then
    they reuse the cache. A no-op in a single process."""
    if dist.is_distributed():
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield
    else:
        yield
