"""Data-parallel training on torch.distributed (DistributedDataParallel), launched with torchrun.

Each rank trains on its own shard of the training images with its own replay-buffer shard;
DDP averages the gradients, so every rank holds the same weights after every step. Rank 0
alone writes checkpoints and the model file.  Backend: NCCL on CUDA GPUs, gloo on the CPU.

    torchrun --nproc-per-node 4 -m jem_core train DATA --out model.pt            # one machine, 4 GPUs
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m jem_core train DATA --out model.pt
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import JEMError
from .device import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_name: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise JEMError("This PyTorch build has no torch.distributed; train with a single process.")
    use_cuda = resolve_device(device_name).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise JEMError(f"torchrun started local rank {local_rank} but this machine has "
                           f"{torch.cuda.device_count()} GPU(s). Lower --nproc-per-node.")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    except (RuntimeError, ValueError) as error:
        raise JEMError(f"Could not join the distributed training group ({str(error)[:200]}). Check the torchrun "
                       "rendezvous endpoint and that every node can reach it.") from None
    return current()


def current() -> DistContext:
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def device_for(ctx: DistContext, name: str) -> torch.device:
    """Each rank on a machine takes its own GPU; on the CPU all ranks share it."""
    device = resolve_device(name)
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The model the optimiser step runs through: DDP when distributed, the model itself otherwise."""
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's share of indices (every world_size-th one, so class balance is kept)."""
    part = indices[ctx.rank::ctx.world_size]
    if len(part) == 0:
        raise JEMError(f"Too few training images ({len(indices)}) for {ctx.world_size} processes; "
                       "use fewer processes.")
    return part


def average(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Mean of each value over the ranks, so every rank takes the same decisions."""
    if not ctx.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / ctx.world_size).tolist()


def any_rank(flags: list[bool], ctx: DistContext, device: torch.device) -> list[bool]:
    """Each flag true on every rank if it is true on any rank."""
    if not ctx.active:
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's obj, in rank order (a one-element list when not distributed)."""
    if not ctx.active:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
