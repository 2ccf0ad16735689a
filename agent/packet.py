"""Measured steps' device-side statistics, reduced across ranks and brought to the host together.

This module owns every collective and every host-device sync the agent makes:

* entries marked SUM are concatenated and all-reduced once (`all_reduce(SUM)`),
* entries marked MAX are concatenated and all-reduced once (`all_reduce(MAX)`),
* entries marked LOCAL are values every rank already holds identically (DDP-averaged gradients),
  so they are not reduced at all,
* then everything is copied to the host once.

`Combined` does that for the packets of several consecutive measured steps at once (across ranks,
mode observe combines about `combine_seconds` of them), so 0-2 collectives and 1 sync are paid per combination,
whatever the number of layers or steps in it. Which entries exist depends only on the step counter
and the static configuration, never on local state, so every rank issues the same collectives in
the same order.
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

    @property
    def size(self) -> int:
        return self._flat.numel()

    def unpack(self, host: list[float]) -> dict[str, list[float]]:
        """This packet's entries, by name, from its flat buffer read to the host."""
        return {name: host[start:end] for name, start, end in self._layout}


class Combined:
    """The packets of consecutive measured steps, reduced together: one all-reduce per op (SUM, and
    MAX if any packet has MAX entries) for all of them, then one host copy. A collective's and a
    sync's fixed price (a gloo round trip: ~0.5 ms of CPU on the benchmark machine; on a GPU, the
    host's wait for the device) is paid once per combination, not once per step."""

    def __init__(self, packets: list[Packet], group: Optional[dist.ProcessGroup], world_size: int,
                 counters: Counters) -> None:
        """Start the reductions without waiting: the caller may do other work (the optimizer's
        step) while they run; `to_host` waits."""
        self.packets = packets
        self._works: list[dist.Work] = []
        self._scatter: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # reduced copy -> the views it came from
        if world_size == 1:
            return
        for op, dist_op in ((Reduce.SUM, dist.ReduceOp.SUM), (Reduce.MAX, dist.ReduceOp.MAX)):
            parts = [p.buffers[op] for p in packets if p.buffers[op].numel()]
            if not parts:
                continue
            buffer = parts[0] if len(parts) == 1 else torch.cat(parts)
            if op is Reduce.MAX:
                # NaN has no order: as +inf it survives MAX on every backend and still reads "non-finite".
                torch.nan_to_num(buffer, nan=float("inf"), posinf=float("inf"), out=buffer)
            self._works.append(dist.all_reduce(buffer, op=dist_op, group=group, async_op=True))
            counters.collectives += 1
            if len(parts) > 1:
                self._scatter.append((buffer, parts))

    def to_host(self, counters: Counters) -> list[dict[str, list[float]]]:
        """Wait for the reductions, then one host copy of every packet: each one's entries, by name."""
        for work in self._works:
            work.wait()
        self._works = []
        for buffer, parts in self._scatter:
            for part, reduced in zip(parts, buffer.split([p.numel() for p in parts])):
                part.copy_(reduced)
        flats = [p._flat for p in self.packets]
        host = (flats[0] if len(flats) == 1 else torch.cat(flats)).cpu().tolist()
        counters.host_syncs += 1
        out, offset = [], 0
        for packet in self.packets:
            out.append(packet.unpack(host[offset:offset + packet.size]))
            offset += packet.size
        return out
