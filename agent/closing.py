"""Reading the last, partial combination of steps when the agent closes.

Across ranks, mode observe combines about `combine_seconds` of measured steps per collective (packet.py).
When training ends the last few steps are filled but not yet combined. Reading them takes a collective, and
`close()` is not a point every rank is known to reach together: it may run on one rank alone (an
exception, a `finally`), or long after the others (rank 0 writing a checkpoint first). On the training
process group such a collective could pair with one of the user's and corrupt or hang the job.

So the agent makes a gloo group of its own, used only here, with a short timeout: at worst a lone
`close()` waits `TIMEOUT_S` and drops the steps (logged); it can never pair with a training collective.
Making a group is itself a meeting of every rank, so it is made at the agent's first measured step, not
when the agent is built: every rank reaches that step (the step counter decides it), within moments of
the others (the training's own collectives just met), and only once every rank has an agent. Made in
the constructor, one rank whose agent failed to build (auto-attach, which then agrees to attach nowhere)
would leave the others waiting in it. `close()` destroys the group.
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional

import torch
import torch.distributed as dist

from .packet import Combined, Counters, Packet

log = logging.getLogger("gradwatch.agent")

TIMEOUT_S = 15.0


class ClosingGroup:
    """A gloo process group for the close-time read; `group` is None where it could not be made
    (logged) or was destroyed."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()  # kept: at exit the default group may be gone before close() runs
        self.group: Optional[dist.ProcessGroup] = None
        try:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        except Exception as exc:  # a timeout: the other ranks did not meet it; nothing else is affected
            log.warning("gradwatch: no process group for the close-time read on rank %d (%r); the steps "
                        "still pending when the agent closes will not be published", self.rank, exc)

    def read(self, packets: list[Packet], steps: list[int], world_size: int,
             counters: Counters) -> Optional[list[dict[str, list[float]]]]:
        """The packets' reduced values, or None (logged on rank 0) when the ranks did not all close
        with the same steps pending, did not all close within the timeout, or the group is gone."""
        try:
            if self.group is None:
                raise RuntimeError("the agent has no group for it (not made, or destroyed)")
            # Every rank must hold the same steps: the max of (x, -x) over ranks gives (max, -min).
            span = torch.tensor([steps[0], steps[-1], len(steps)], dtype=torch.float64)
            check = torch.cat([span, -span])
            dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self.group)
            counters.collectives += 1
            if not torch.equal(check[:3], -check[3:]):
                reason = "the ranks closed with different steps pending"
            else:
                return Combined(packets, self.group, world_size, counters).to_host(counters)
        except Exception as exc:  # a rank that never closes or closes late (a timeout), or no group left
            reason = f"no read across ranks ({exc!r:.200}; each collective is bounded by {TIMEOUT_S:g} s)"
        if self.rank == 0:
            log.warning("gradwatch: steps %d-%d were measured but not combined before close: %s; they are not published",
                        steps[0], steps[-1], reason)
        return None

    def destroy(self) -> None:
        """Release the group's connections (an agent per trial or per `trainer.train()` must not leak
        one each). Local: no collective."""
        group, self.group = self.group, None
        try:
            if group is not None:
                dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # destroy_process_group() of the default group took it already
            pass
