"""Worker functions for tests/test_distributed_launch.py: spawned ranks import them by name."""

import os
import time

import torch
import torch.distributed as dist


def rank_sum(offset: float) -> dict:
    value = torch.tensor([float(dist.get_rank()) + offset])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value,
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    dist.barrier()


def exit_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def sleep_forever() -> None:
    time.sleep(600)
