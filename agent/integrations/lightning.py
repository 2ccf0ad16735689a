"""Lightning adapter: `Trainer(callbacks=[GradwatchCallback(job="my-run", mode="guard")])`.

Design: the agent owns the optimizer step. Under automatic optimization Lightning's precision plugin
calls the raw optimizer's `step(closure)`, and the closure runs training_step, backward, the
`on_before_optimizer_step` hooks and Lightning's gradient clipping. The callback routes that
`step` through the agent (`HealthAgent.wrap`, step_router.py), so right after `on_before_optimizer_step` the
agent measures the final gradients, decides (guard: skip a non-finite step on every rank, clip a
spike) and steps - or does not. The same holds for:
- gradient accumulation: the accumulating micro-batches run their closures outside the step; the
  loss of every micro-batch is collected at `on_before_backward` and the step's loss is their mean;
- AMP with a GradScaler (`16-mixed`): Lightning unscales before `on_before_optimizer_step` and
  calls `scaler.step(optimizer)`, which calls the routed step unless it found an overflow (a step
  GradScaler skips itself, which the agent then does not see; its losses are dropped when the next
  accumulation window starts); the scaled loss is unscaled here;
- manual optimization: `opt.step()` reaches the same routed step, once per call.
Strategies that step the optimizer themselves (DeepSpeed) are not supported.

Only this module imports Lightning. Every hook fails open: an error is logged once and training goes
on, uninstrumented if attaching failed. A bad configuration is rejected at construction.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from ..config import AgentConfig
from ..health_agent import HealthAgent, attached_agent
from .adapters import LossWindow, OnceLogger

log = logging.getLogger("gradwatch.agent")


class GradwatchCallback(pl.Callback):
    """Attach a `HealthAgent` to the fit's model and (first) optimizer; `settings` are AgentConfig
    fields. If the user already attached an agent to the module or optimizer, that one is used and
    nothing is instrumented twice. `self.agent` is the agent in use (None before fit)."""

    def __init__(self, config: Optional[AgentConfig] = None, **settings: Any) -> None:
        base = config.model_dump() if config is not None else {}
        self.config = AgentConfig(**{**base, **settings})  # raises here, naming the field
        self.agent: Optional[HealthAgent] = None
        self._owned = False  # we built the agent (and route the step): we close it
        self._scaler: Any = None
        self._fail = OnceLogger("lightning")
        self._losses = LossWindow(self._fail)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._attach(trainer, pl_module)
        except Exception as exc:
            self._fail("attaching the agent", exc)
            self._close()  # if it was built: stop its server and hooks
            self.agent, self._owned = None, False

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.strategy.optimizers  # the raw torch optimizers, after strategy setup
        model = trainer.strategy.model or pl_module  # the DDP/FSDP-wrapped module, for topology
        previous = self.agent if self._owned else None
        for candidate in (*optimizers[:1], model, pl_module):
            existing = attached_agent(candidate)
            if existing is not None and existing is not previous:
                self.agent, self._owned = existing, False  # the user's: they step and close it
                return
        if not optimizers:
            raise RuntimeError("the LightningModule configured no optimizer: nothing to measure")
        if len(optimizers) > 1:
            log.warning("gradwatch: %d optimizers; gradwatch follows the first only", len(optimizers))
        self._losses.clear()
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.agent = HealthAgent(model, optimizers[0], config=self.config)
        self._owned = True
        if trainer.gradient_clip_val:
            log.warning("gradwatch: Lightning clips gradients (gradient_clip_val=%g) before the optimizer step, so "
                        "gradwatch measures clipped norms; for raw norms drop it and let the guard clip "
                        "(mode='guard', guard_max_norm=...)", trainer.gradient_clip_val)
        self.agent.wrap(optimizers[0], loss=self._step_loss)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # A new accumulation window. Losses the routed step did not take are dropped here: under
        # 16-mixed, GradScaler skips an overflowing step without calling it.
        if pl_module.automatic_optimization and batch_idx % max(trainer.accumulate_grad_batches, 1) == 0:
            self._losses.clear()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self._owned:
            return
        # Under automatic optimization Lightning divided the loss by the accumulation count.
        self._losses.add(loss, trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)

    def _step_loss(self) -> Optional[torch.Tensor]:
        """The mean loss of the step's micro-batches (unscaled under AMP), or None."""
        return self._losses.take(divisor=self._loss_scale)

    def _loss_scale(self) -> float:
        """What on_before_backward's losses were multiplied by: AMP's scale (a host read; AMP's own step
        reads found_inf anyway), else 1."""
        scaler = self._scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._owned and self.agent is not None:
            try:
                self.agent.close()
            except Exception as exc:
                self._fail("closing the agent", exc)
