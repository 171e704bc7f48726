"""torch.distributed in one place: joining the process group, this process's rank and device, gathering shards.

Under ``torchrun`` or ``accelerate launch`` every process runs the same command; scoring splits
batches by rank (process r takes batches r, r + W, ...), gathers every process's rows, and only
the main process writes files.
"""

from __future__ import annotations

import os

import torch


def world_size_from_environment() -> int:
    """``WORLD_SIZE`` as the launcher set it (1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment (NCCL on GPUs, gloo
    on CPU)."""
    if world_size_from_environment() > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def process_device(device: str | None) -> str | None:
    """The requested device, or under torch.distributed on GPUs this process's ``cuda:LOCAL_RANK``."""
    if device is None and world_size_from_environment() > 1 and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def gather_shards(shard: tuple[list, ...]) -> tuple[list, ...]:
    """Every process's ``shard`` (a tuple of lists), each list concatenated over ranks in rank order; the shard itself
    on one process."""
    rank, world = rank_and_world()
    if world == 1:
        return shard
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, shard)
    return tuple([item for part in gathered for item in part[field]] for field in range(len(shard)))
