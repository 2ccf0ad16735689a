"""Route `optimizer.step(closure)` itself through an agent, for loops the user does not write.

Lightning, the HF Trainer and `gradwatch run --auto-attach` call `optimizer.step()` themselves, so
they cannot call `agent.step(optimizer, loss=...)`. `route` replaces the optimizer's step with a
bound method that runs the closure, if any (forward and backward, as `torch.optim` does), then
`agent.step`, which measures, guards and takes the real step.

One attribute marks a routed optimizer: `_gradwatch_raw_step`, the optimizer's own step (with the
routed call's keyword arguments) - what `agent.step` calls to step for real, and what re-routing
checks for. An optimizer that runs a GradScaler in its own step (accelerate's `AcceleratedOptimizer`
under fp16: `scaler.step(inner)`, then `scaler.update()`) gets its scaler handed to the agent, so
gradients are unscaled before they are measured and an fp16 overflow stays the scaler's own skip.
"""

from __future__ import annotations

import inspect
import types
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

if TYPE_CHECKING:
    from .health_agent import HealthAgent

RAW_STEP = "_gradwatch_raw_step"

StepLoss = Callable[[], Union[torch.Tensor, float, None]]


def raw_step(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    """The optimizer's own step below any routing (its plain `step` when it is not routed)."""
    return getattr(optimizer, RAW_STEP, None) or optimizer.step


def is_routed(optimizer: Any) -> bool:
    return getattr(optimizer, RAW_STEP, None) is not None


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """LBFGS re-evaluates the loss inside its step: it cannot step once the closure was consumed."""
    try:
        param = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read (a builtin): assume torch's contract
        return False
    return param is not None and param.default is inspect.Parameter.empty


def route(agent: "HealthAgent", optimizer: torch.optim.Optimizer, step_loss: Optional[StepLoss] = None) -> None:
    """Make `optimizer.step(closure=None, **kwargs)` run the closure, then `agent.step` with the loss
    `step_loss()` (an adapter that gathered it over micro-batches; it must not raise), else the
    closure's value. Returns what the closure returned, or the step's result without one. Idempotent;
    the caller checks `needs_closure` first."""
    if is_routed(optimizer):
        return
    original = optimizer.step
    scaler, inner = getattr(optimizer, "scaler", None), getattr(optimizer, "optimizer", None)
    own_scaler = scaler is not None and inner is not None and scaler.is_enabled()
    call_kwargs: dict[str, Any] = {}  # the routed call's keyword arguments, for the raw step

    def raw() -> Any:
        return original(**call_kwargs)

    def step(_optimizer: Any, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        if agent.stepping:  # GradScaler.step -> optimizer.step inside agent.step: the real step
            return original(closure, **kwargs) if closure is not None else original(**kwargs)
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        value = step_loss() if step_loss is not None else returned
        loss = value if isinstance(value, (torch.Tensor, float, int)) else None
        call_kwargs.update(kwargs)
        try:
            if own_scaler:
                result = _step_scaling_itself(agent, optimizer, inner, scaler, raw, loss)
            else:
                result = agent.step(optimizer, loss=loss)
        finally:
            call_kwargs.clear()
        return returned if closure is not None else result

    if getattr(original, "_wrapped_by_lr_sched", False):
        # An LR scheduler's step counter sits below this one and still runs: keep its marker, or
        # torch warns that optimizer.step was overridden after the scheduler was built.
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    setattr(optimizer, RAW_STEP, raw)
    # A bound method, as torch's own: an LR scheduler built later re-wraps `step.__func__`.
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]


class _OwnStepScaler:
    """What `agent.step(scaler=...)` needs of a GradScaler, for an optimizer whose own step already
    runs the scaler: `unscale_` goes to the torch optimizer inside (the one the scaler tracks), and
    `step` is the optimizer's raw step (scaler.step + update). `ran` tells whether the agent skipped."""

    def __init__(self, scaler: Any, inner: torch.optim.Optimizer, run: Callable[[], Any]) -> None:
        self.scaler, self.inner, self.run, self.ran = scaler, inner, run, False

    def is_enabled(self) -> bool:
        return bool(self.scaler.is_enabled())

    def unscale_(self, _optimizer: Any) -> None:
        self.scaler.unscale_(self.inner)

    def step(self, _optimizer: Any) -> Any:
        self.ran = True
        return self.run()


def _step_scaling_itself(agent: "HealthAgent", optimizer: Any, inner: torch.optim.Optimizer, scaler: Any,
                         raw: Callable[[], Any], loss: Any) -> Any:
    own = _OwnStepScaler(scaler, inner, raw)
    result = agent.step(optimizer, loss=loss, scaler=own)  # type: ignore[arg-type]
    if not own.ran:
        # The agent skipped (guard or skip_steps): the raw step, and with it scaler.update(), did not
        # run. Update now, or the next step's unscale_ raises "already been called".
        try:
            own.unscale_(inner)  # records the inf check update() needs, if nothing unscaled yet
        except RuntimeError as exc:
            if "already been called" not in str(exc):
                raise
        scaler.update()
    return result
