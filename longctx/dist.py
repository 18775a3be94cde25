"""Distributed facts in one place: rank, world size, this process's device, the main process, a barrier.

torchrun (and SLURM through it) sets RANK / LOCAL_RANK / WORLD_SIZE before anything starts, so they are read from
the environment; once torch.distributed is initialised its answer wins (it is the same unless a launcher lied).
"""

from __future__ import annotations

import os

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
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
