"""Reading the last, partial combination of steps when the agent closes.

Across ranks, mode observe combines about `combine_seconds` of measured steps per collective (packet.py).
When training ends the last few steps are filled but not yet combined. Reading them takes a collective, and
`close()` is not a point every rank is known to reach together: it may run on one rank alone (an
exception, a `finally`), or long after the others (rank 0 writing a checkpoint first). On the training
process group such a collective could pair with one of the user's and corrupt or hang the job.

So the agent makes a gloo group of its own when it is built (every rank builds the agent at the same
point; the group is made first, before anything in the agent that could fail on one rank alone, and with
the default timeout, so ranks that reach it minutes apart still meet). It is used only here, each
collective bounded by `TIMEOUT_S`: at worst a lone `close()` waits that long and drops the steps
(logged); it can never pair with a training collective. `close()` destroys the group.
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
    """A gloo process group for the close-time read."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()  # kept: at exit the default group may be gone before close() runs
        self.group: Optional[dist.ProcessGroup] = dist.new_group(backend="gloo")

    def read(self, packets: list[Packet], steps: list[int], world_size: int,
             counters: Counters) -> Optional[list[dict[str, list[float]]]]:
        """The packets' reduced values, or None (logged on rank 0) when the ranks did not all close
        with the same steps pending, did not all close within the timeout, or the group is gone."""
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        try:
            if self.group is None:
                raise RuntimeError("the group was destroyed")
            # Every rank must hold the same steps: the max of (x, -x) over ranks gives (max, -min).
            span = torch.tensor([steps[0], steps[-1], len(steps)], dtype=torch.float64)
            check = torch.cat([span, -span])
            options = dist.AllreduceOptions()
            options.reduceOp, options.timeout = dist.ReduceOp.MAX, timeout
            self.group.allreduce([check], options).wait()
            counters.collectives += 1
            if not torch.equal(check[:3], -check[3:]):
                reason = "the ranks closed with different steps pending"
            else:
                return Combined(packets, self.group, world_size, counters, timeout).to_host(counters)
        except Exception as exc:  # a rank that never closes or closes late (a timeout), or no group left
            reason = f"no read across ranks within {TIMEOUT_S:g} s ({exc!r:.200})"
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
