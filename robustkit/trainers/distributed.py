"""Distributed data parallel training when launched by ``torchrun`` (gloo on CPU, nccl on CUDA).

Every process reads the same data order (same seed) and takes its share of each global batch, so a run with
N processes sees the same batches as a single process, and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world`` processes (1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        # leaving the group to interpreter teardown can abort the process (gloo's worker threads outlive the
        # interpreter): a script that trains and returns without destroying the group must still exit cleanly
        atexit.register(leave_group)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())


def leave_group() -> None:
    """Destroy the process group when there is one (at the end of a command, and at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """On CUDA under torchrun each process takes the GPU of its local rank."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over all processes."""
    if not info.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shard(index: Tensor, info: DistInfo) -> Tensor:
    """This process's share of a batch of indices."""
    return index[info.rank :: info.world] if info.active else index
