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
import types
from typing import Any, Callable, Optional

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
    `torch.optim` does. `step_loss` must not raise (the adapter guards it).

    An optimizer that runs a GradScaler in its own step (accelerate's `AcceleratedOptimizer` under
    fp16: `scaler.step(inner)`, then `scaler.update()`) is routed by `_route_self_scaling`."""
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is not None and inner is not None and scaler.is_enabled():
        _route_self_scaling(agent, optimizer, inner, scaler, step_loss)
    else:
        agent.wrap(optimizer, loss=step_loss)


class _OwnStepScaler:
    """What `agent.step(scaler=...)` needs of a GradScaler, for an optimizer whose own step already
    runs the scaler: `unscale_` goes to the torch optimizer inside (the one the scaler tracks), and
    `step` is the optimizer's original step (scaler.step + update). So an fp16 overflow is the
    scaler's own skip (the agent counts it as `amp_overflow`), and `ran` tells whether the agent skipped."""

    def __init__(self, scaler: Any, inner: torch.optim.Optimizer, run: Callable[[], Any]) -> None:
        self.scaler, self.inner, self.run, self.ran = scaler, inner, run, False

    def is_enabled(self) -> bool:
        return bool(self.scaler.is_enabled())

    def unscale_(self, _optimizer: Any) -> None:
        self.scaler.unscale_(self.inner)

    def step(self, _optimizer: Any) -> Any:
        self.ran = True
        return self.run()


def _route_self_scaling(agent: HealthAgent, optimizer: Any, inner: torch.optim.Optimizer, scaler: Any,
                        step_loss: StepLoss) -> None:
    if getattr(optimizer, "_gradwatch_original_step", None) is not None:
        return
    original = optimizer.step

    def step(_optimizer: Any, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        own = _OwnStepScaler(scaler, inner, lambda: original(closure, **kwargs))
        result = agent.step(optimizer, loss=step_loss(), scaler=own)  # type: ignore[arg-type]
        if not own.ran:
            # The agent skipped (guard or skip_steps): the original step, and with it scaler.update(),
            # did not run. Update now, or the next step's unscale_ raises "already been called".
            try:
                own.unscale_(inner)  # records the inf check update() needs, if nothing unscaled yet
            except RuntimeError as exc:
                if "already been called" not in str(exc):
                    raise
            scaler.update()
        return result

    if getattr(original, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # see HealthAgent.wrap
    optimizer._gradwatch_original_step = original
    optimizer.step = types.MethodType(step, optimizer)
