"""One step's device-side statistics, reduced across ranks and brought to the host in one copy.

This module owns every collective and every host-device sync the agent makes in a step:

* entries marked SUM are concatenated and all-reduced once (`all_reduce(SUM)`),
* entries marked MAX are concatenated and all-reduced once (`all_reduce(MAX)`),
* entries marked LOCAL are values every rank already holds identically (DDP-averaged gradients),
  so they are not reduced at all,
* then everything is concatenated and copied to the host once (the step's only sync).

So a measured step costs 0-2 collectives and exactly 1 sync, whatever the number of layers. Which
entries exist depends only on the step counter and the static configuration, never on local state,
so every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


class Reduce(enum.Enum):
    SUM = "sum"
    MAX = "max"
    LOCAL = "local"


@dataclass
class Counters:
    """What the agent has cost so far; exported so the documented per-step figures can be checked."""

    collectives: int = 0
    host_syncs: int = 0


@dataclass(frozen=True)
class Entry:
    name: str
    op: Reduce
    size: int


class Packet:
    """Preallocated float64 slots in one flat buffer, laid out from a spec: the SUM entries, then the
    MAX ones, then the LOCAL ones, so each reduction is one contiguous view and the host copy is one
    copy of the whole.

    The spec is derived from the step counter and static configuration only, so every rank allocates
    the same layout even if filling it fails half-way on one rank (that rank raises its error flag
    instead, and the collectives still match).
    """

    def __init__(self, spec: list[Entry], device: torch.device) -> None:
        names = [e.name for e in spec]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate packet entries in {names}")
        self._flat = torch.zeros(sum(e.size for e in spec), dtype=torch.float64, device=device)
        self.buffers: dict[Reduce, torch.Tensor] = {}
        self._views: dict[str, torch.Tensor] = {}
        self._layout: list[tuple[str, int, int]] = []  # name, start, end in the flat buffer
        self._works: list[dist.Work] = []  # reductions started and not yet waited for
        offset = 0
        for op in Reduce:
            first = offset
            for e in spec:
                if e.op is op:
                    self._views[e.name] = self._flat[offset : offset + e.size]
                    self._layout.append((e.name, offset, offset + e.size))
                    offset += e.size
            self.buffers[op] = self._flat[first:offset]

    def clear(self) -> None:
        """Zero the slots, for the next step with the same spec (a packet is reused, not rebuilt)."""
        self._flat.zero_()

    def __contains__(self, name: str) -> bool:
        return name in self._views

    def slot(self, name: str) -> torch.Tensor:
        """The entry's view, for in-place accumulation."""
        return self._views[name]

    def put(self, name: str, value: torch.Tensor) -> None:
        view = self._views[name]
        if value.numel() != view.numel():
            raise ValueError(f"packet entry {name!r} holds {view.numel()} values, got {value.numel()}")
        view.copy_(value.reshape(-1))

    def start_reduce(self, group: Optional[dist.ProcessGroup], world_size: int, counters: Counters) -> None:
        """Issue the SUM and MAX all-reduces (one collective each, if non-empty) without waiting:
        the caller may do other work (the optimizer's step) while they run; `to_host` waits."""
        if world_size > 1:
            for op, dist_op in ((Reduce.SUM, dist.ReduceOp.SUM), (Reduce.MAX, dist.ReduceOp.MAX)):
                buffer = self.buffers[op]
                if buffer.numel() == 0:
                    continue
                if op is Reduce.MAX:
                    # NaN has no order: as +inf it survives MAX on every backend and still reads "non-finite".
                    torch.nan_to_num(buffer, nan=float("inf"), posinf=float("inf"), out=buffer)
                self._works.append(dist.all_reduce(buffer, op=dist_op, group=group, async_op=True))
                counters.collectives += 1

    def to_host(self, counters: Counters) -> dict[str, list[float]]:
        """Wait for the reductions started, then the step's one host copy."""
        for work in self._works:
            work.wait()
        self._works = []
        host = self._flat.cpu().tolist()
        counters.host_syncs += 1
        return {name: host[start:end] for name, start, end in self._layout}
