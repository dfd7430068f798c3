"""Data-parallel fine-tuning under torchrun: PyTorch's own process groups and DistributedDataParallel.

``torchrun --nproc_per_node=N --no-python lcnn-convert MODEL --finetune DATASET`` starts N copies of
the command; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells each copy
who it is. Every rank loads, converts and fine-tunes the same model on its share of the data; rank 0
alone measures, writes checkpoints, exports, verifies and reports; the other ranks exit after
training. Without torchrun's environment everything runs in one process, as before.

BatchNorm statistics are per rank, as DDP does with ``nn.BatchNorm``: in train mode each rank
normalises with its own batch (of batch_size / world_size images), and the running statistics are
rank 0's, broadcast to every rank before each forward (DDP's ``broadcast_buffers``). Lipschitz BN's
clip factor uses those running statistics, so it is the same on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import LcnnError

# How long a rank waits in a collective: the others wait while rank 0 alone measures the original
# and converted models (minutes on large test sets); a dead peer is usually noticed far sooner.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(device_preference: str = "auto") -> DistributedContext | None:
    """Join the process group torchrun describes (None when not launched with several processes).

    The backend follows the device: nccl when the ranks train on CUDA, gloo on the CPU.
    """
    if not launched_by_torchrun():
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_preference != "cpu" and torch.cuda.is_available()
    if device_preference == "cuda" and not use_cuda:
        raise LcnnError("--device cuda was asked for but no CUDA device is available")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LcnnError(
                f"rank {rank} has LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise LcnnError(f"rank {rank}: cannot join the {backend} process group: {error}") from error
    return DistributedContext(rank, world_size, local_rank, backend, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share_outcome(context: DistributedContext | None, error: str | None) -> None:
    """Make a check that only rank 0 ran fail on every rank, with rank 0's message."""
    if context is None:
        if error:
            raise LcnnError(error)
        return
    message: list[Any] = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise LcnnError(message[0] if context.is_main else f"rank 0 stopped the job: {message[0]}")


def broadcast_from_main(context: DistributedContext | None, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a checkpoint read by rank 0, for instance)."""
    if context is None:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_ranks(context: DistributedContext | None, values: torch.Tensor) -> torch.Tensor:
    if context is None:
        return values
    values = values.detach().to(context.device, torch.float64 if context.backend == "gloo" else torch.float32).clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu().double()
