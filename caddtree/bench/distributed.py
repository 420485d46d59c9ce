"""Scale-out under `torchrun --nproc-per-node N -m caddtree bench ...`: prompts are sharded across
processes and the records gathered on rank 0, which alone writes the outputs.

Without torchrun's environment (WORLD_SIZE, RANK) everything runs in this one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def shard(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's share, round-robin: every item lands in exactly one shard, and the shards'
    sizes differ by at most one (prompts of one dataset are spread over all ranks)."""
    return items[rank::world_size]


def start(device: str) -> Process:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    process = Process(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if process.distributed and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(process.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return process


def process_device(process: Process, device: str) -> str:
    """Under torchrun on CUDA each process drives its own GPU."""
    return f"cuda:{process.local_rank}" if process.distributed and device.startswith("cuda") else device


def from_main(process: Process, make: Callable[[], Item]) -> Item:
    """`make()` on rank 0, its result sent to every rank (so all decode with one cost model)."""
    if not process.distributed:
        return make()
    box = [make() if process.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(process: Process, items: list[Item]) -> list[Item] | None:
    """Every rank's items, concatenated in rank order, on rank 0; None elsewhere."""
    if not process.distributed:
        return items
    parts = [None] * process.world_size if process.is_main else None
    dist.gather_object(items, parts, dst=0)
    return [item for part in parts for item in part] if process.is_main else None


def finish(process: Process) -> None:
    if process.distributed and dist.is_initialized():
        # Leave together: a rank that tears gloo down while rank 0 still drains the gather aborts
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
