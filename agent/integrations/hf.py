"""Hugging Face Trainer adapter: `Trainer(..., callbacks=[GradwatchCallback(job="my-run")])`.

Design: the agent owns the optimizer step. At `on_train_begin` the Trainer has built and prepared
its optimizer (accelerate's `AcceleratedOptimizer`); the callback routes that object's `step()`
through the agent (`HealthAgent.wrap`, step_router.py). The Trainer clips gradients (`max_grad_norm`, which also
unscales fp16 gradients), calls `on_pre_optimizer_step`, then `optimizer.step()`: there the agent
measures, decides (guard: skip a non-finite step on every rank, clip a spike) and calls the
`AcceleratedOptimizer.step` it replaced - or does not. Routing the outer object, not the torch
optimizer inside it, keeps accelerate's GradScaler handling intact (it swaps the inner `step`);
under fp16 an overflow is GradScaler's own skip, and a step the agent skips still updates the
scaler (step_router.py).

Callbacks are not given the loss, so the callback reads it where the Trainer gets it: the `loss`
of the model's output, from a forward hook, for every training micro-batch (grad enabled). The step's
loss is then what the Trainer logs for the step: the mean of the micro-batch losses, or their sum when
the Trainer passed `num_items_in_batch` (the model already divided by the window's token count),
times the world size when tokens are averaged across devices. A loss the Trainer computes outside the
model (`compute_loss_func`, label smoothing) is not seen: statistics then have no loss.

Only this module imports transformers. Every hook fails open: an error is logged once and training
goes on. The Trainer has no exception event: the agent is closed at `on_train_end`; on a crash its
threads are daemons and end with the process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import AgentConfig
from ..health_agent import HealthAgent, attached_agent
from .adapters import LossWindow, OnceLogger

log = logging.getLogger("gradwatch.agent")


class GradwatchCallback(TrainerCallback):
    """Attach a `HealthAgent` to the Trainer's model and optimizer; `settings` are AgentConfig
    fields. If the user already attached an agent to the model or optimizer, that one is used and
    nothing is instrumented twice. `self.agent` is the agent in use (None before training)."""

    def __init__(self, config: Optional[AgentConfig] = None, **settings: Any) -> None:
        base = config.model_dump() if config is not None else {}
        self.config = AgentConfig(**{**base, **settings})  # raises here, naming the field
        self.agent: Optional[HealthAgent] = None
        self._owned = False
        self._hook: Any = None
        self._per_item = False  # the model normalised by num_items_in_batch: micro-batch losses add up
        self._loss_scale = 1
        self._fail = OnceLogger("hf")
        self._losses = LossWindow(self._fail)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[torch.nn.Module] = None, optimizer: Any = None, **kwargs: Any) -> None:
        try:
            self._attach(args, model, optimizer)
        except Exception as exc:
            self._fail("attaching the agent", exc)
            self.on_train_end(args, state, control)  # if it was built: stop its server and hooks
            self.agent, self._owned = None, False

    def _attach(self, args: TrainingArguments, model: Optional[torch.nn.Module], optimizer: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to on_train_begin")
        previous = self.agent if self._owned else None
        for candidate in (optimizer, getattr(optimizer, "optimizer", None), model):
            existing = attached_agent(candidate) if candidate is not None else None
            if existing is not None and existing is not previous:
                self.agent, self._owned = existing, False  # the user's: they step and close it
                return
        averaged = args.average_tokens_across_devices and args.world_size > 1
        self._loss_scale = args.world_size if averaged else 1
        self._losses.clear()
        self.agent = HealthAgent(model, optimizer, config=self.config)
        self._owned = True
        if args.max_grad_norm and args.max_grad_norm > 0:
            log.warning("gradwatch: the Trainer clips gradients to max_grad_norm=%g before the optimizer step, so "
                        "gradwatch measures clipped norms; for raw norms set max_grad_norm=0 and let the guard "
                        "clip (mode='guard', guard_max_norm=...)", args.max_grad_norm)
        self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)
        self.agent.wrap(optimizer, loss=self._step_loss)

    def _read_loss(self, module: torch.nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation or generation
        try:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                self._per_item = kwargs.get("num_items_in_batch") is not None
                self._losses.add(loss, self._loss_scale if self._per_item else 1)
        except Exception as exc:
            self._fail("reading the loss", exc)

    def _step_loss(self) -> Optional[torch.Tensor]:
        return self._losses.take(summed=self._per_item)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._detach_hook()
        if self._owned and self.agent is not None:
            try:
                self.agent.close()
            except Exception as exc:
                self._fail("closing the agent", exc)

    def _detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
