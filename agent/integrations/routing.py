"""Route a framework-owned `optimizer.step` through the agent, with the loss the adapter collected.

Frameworks call `optimizer.step()` (or `step(closure)`) themselves, so an adapter cannot call
`agent.step(optimizer, loss=...)`. `HealthAgent.wrap` routes the step but takes the loss from the
closure's return value, which is not the step's loss in general (Lightning: only the last
micro-batch, divided by the accumulation count; HF and AMP: no closure at all). So the adapter
stacks one more layer on top of `wrap`: its closure runs the framework's closure, if any, and then
returns the loss the adapter gathered over the step's micro-batches.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..health_agent import HealthAgent

log = logging.getLogger("gradwatch.agent")

StepLoss = Callable[[], Optional[torch.Tensor]]


class OnceLogger:
    """Fail-open for adapters: log each kind of failure once, never raise into the training loop."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self._seen: set[str] = set()

    def __call__(self, what: str, exc: BaseException) -> None:
        if what not in self._seen:
            self._seen.add(what)
            log.error("gradwatch %s adapter: %s failed; training goes on: %r", self.adapter, what, exc, exc_info=exc)


def route_step(agent: HealthAgent, optimizer: torch.optim.Optimizer, step_loss: StepLoss) -> None:
    """Make `optimizer.step(closure=None)` run: the closure (forward and backward, if given), then
    the agent (measure with `step_loss()`, guard, step). Returns what the closure returned, as
    `torch.optim` does. `step_loss` must not raise (the adapter guards it)."""
    agent.wrap(optimizer, loss=step_loss)
