"""Where this process sits in the job: rank, world size, the stats device, and a name for how the
model is distributed (the `sharding` label of gradwatch_agent_info). Which ranks hold which piece of
each parameter is the layout's job (layout.py), read from the tensors' own placements.
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
    sharding: str  # "none" | "ddp" | "fsdp2" (any fully_shard) | "dtensor" (TP, EP) | "fsdp1" | "unknown"
    device: torch.device

    @property
    def rank_local_plain(self) -> bool:
        """FSDP1's flat parameters are plain tensors, each rank's its own shard."""
        return self.sharding == "fsdp1"


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile


def _uses_fully_shard(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch before FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


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
        sharding = "fsdp2" if _uses_fully_shard(model) else "dtensor"
    elif type(inner).__name__ == "FullyShardedDataParallel":
        strategy = str(getattr(inner, "sharding_strategy", ""))
        if "HYBRID" in strategy:  # flat shards replicated across nodes: the copies cannot be told apart
            from .layout import LayoutError

            raise LayoutError(f"FSDP1 with {strategy} is not supported (use FSDP2's fully_shard on a 2-D mesh for HSDP)")
        sharding = "ddp" if "NO_SHARD" in strategy else "fsdp1"
    elif isinstance(inner, DistributedDataParallel):
        sharding = "ddp"
    elif world_size == 1:
        sharding = "none"
    else:
        sharding = "unknown"
        if rank == 0:
            log.warning(
                "gradwatch: the model is neither DDP nor FSDP in a %d-rank job; parameters with the same name "
                "on several ranks are taken as identical copies (measured once)", world_size,
            )
    return Topology(rank=rank, world_size=world_size, sharding=sharding, device=device)
