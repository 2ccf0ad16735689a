"""Where this process sits in the job: rank, world size, and how gradients are distributed.

The answer decides which statistics need a collective: replicated gradients (DDP, or one process)
are final on every rank; sharded ones (FSDP2 DTensors, FSDP1 flat parameters) must be summed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    sharding: str  # "none" | "ddp" | "fsdp2" | "fsdp1" | "unknown"
    device: torch.device

    @property
    def sharded(self) -> bool:
        return self.sharding in ("fsdp2", "fsdp1")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile


def detect(model: torch.nn.Module) -> Topology:
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    first = params[0]
    device = first.to_local().device if _is_dtensor(first) else first.device
    inner = _unwrap(model)
    from torch.nn.parallel import DistributedDataParallel

    if any(_is_dtensor(p) for p in params):
        sharding = "fsdp2"
    elif type(inner).__name__ == "FullyShardedDataParallel":
        sharding = "fsdp1"
    elif isinstance(inner, DistributedDataParallel):
        sharding = "ddp"
    elif world_size == 1:
        sharding = "none"
    else:
        sharding = "unknown"
        if rank == 0:
            log.warning(
                "gradwatch: the model is neither DDP nor FSDP in a %d-rank job; gradient statistics are "
                "taken as replicated (each rank's own)", world_size,
            )
    return Topology(rank=rank, world_size=world_size, sharding=sharding, device=device)
