"""What every framework adapter shares: failing open once per kind of failure, and the step's loss.

Frameworks call `optimizer.step()` themselves; an adapter routes that step through the agent
(`HealthAgent.wrap`, step_router.py) with the loss it gathered over the step's micro-batches in a
`LossWindow`, because the closure's value is not the step's loss in general (Lightning: the last
micro-batch only, divided by the accumulation count; HF, accelerate and AMP: no closure at all).
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger("gradwatch.agent")

# The micro-batch losses one window keeps: a loop that calls backward without ever stepping keeps the
# latest this many, not all of them.
MAX_MICRO_BATCHES = 1024


class OnceLogger:
    """Fail-open for adapters: log each kind of failure once, never raise into the training loop."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self._seen: set[str] = set()

    def __call__(self, what: str, exc: BaseException) -> None:
        if what not in self._seen:
            self._seen.add(what)
            log.error("gradwatch %s adapter: %s failed; training goes on: %r", self.adapter, what, exc, exc_info=exc)


class LossWindow:
    """The losses of one optimizer step's micro-batches, kept on their device (no host sync), each a
    one-element float32 tensor. `take` empties the window: once per step, from the routed step."""

    def __init__(self, fail: OnceLogger) -> None:
        self._fail = fail
        self._losses: collections.deque[torch.Tensor] = collections.deque(maxlen=MAX_MICRO_BATCHES)

    def __len__(self) -> int:
        return len(self._losses)

    def add(self, loss: torch.Tensor, factor: float = 1.0) -> None:
        """One micro-batch's loss (its mean if it has several elements), times `factor`. Never raises."""
        try:
            value = loss.detach().float().reshape(-1).mean()
            self._losses.append(value * factor if factor != 1 else value)
        except Exception as exc:
            self._fail("reading the loss", exc)

    def clear(self) -> None:
        self._losses.clear()

    def take(self, summed: bool = False, divisor: Optional[Callable[[], float]] = None) -> Optional[torch.Tensor]:
        """The window's losses as one tensor (the agent averages it), or their sum with `summed` (losses
        normalised over the whole step's items add up); divided by `divisor()` if given (read at take
        time: a GradScaler's scale). None for an empty window, or if combining them failed (logged)."""
        losses = list(self._losses)
        self._losses.clear()
        if not losses:
            return None
        try:
            stacked = torch.stack(losses)
            value = stacked.sum() if summed else stacked
            return value / divisor() if divisor is not None else value
        except Exception as exc:
            self._fail("reading the loss", exc)
            return None
