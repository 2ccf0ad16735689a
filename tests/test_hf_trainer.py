"""The Hugging Face Trainer adapter on real Trainer runs (examples/train_hf.py: a tiny GPT-2 built
from a config, nothing downloaded): statistics every optimizer step with the loss and gradient norm
the Trainer logged, the guard skipping a NaN step, no double instrumentation, fail-open."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradwatch.agent import HealthAgent  # noqa: E402
from gradwatch.agent.integrations.hf import GradwatchCallback  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_hf.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_hf_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def callback_of(trainer: Trainer, kind: type):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


class GradProbe(TrainerCallback):
    """Independent per-parameter gradient norms right before the step, and whether the step changed
    the parameters (bitwise)."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []
        self.changed: list[bool] = []
        self._before: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append([float(p.grad.norm()) for p in model.parameters()])
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, model.parameters())))


def test_statistics_every_step_with_the_trainers_loss(tmp_path):
    ex = load_example()
    probe = GradProbe()
    trainer = ex.build(ex.parse(["--max-steps", "4", "--accumulate", "2", "--mode", "observe"]), str(tmp_path), probe)
    trainer.train()
    rows = callback_of(trainer, ex.StepLog).steps
    agent = callback_of(trainer, GradwatchCallback).agent
    assert agent.step_count == 4 and [r["step"] for r in rows] == [0, 1, 2, 3]
    names = [n for n, _ in trainer.model.named_parameters()]
    for row, ref in zip(rows, probe.norms):
        # the Trainer's own log: its loss over the 2 accumulated micro-batches, its pre-clip norm
        assert row["gradwatch_loss"] == pytest.approx(row["trainer_loss"], rel=1e-6)
        assert row["grad_norm"] == pytest.approx(row["trainer_grad_norm"], rel=1e-5)
        assert row["layers"] == names
        assert row["layer_grad_norm"] == pytest.approx(ref, rel=1e-5)
    assert all(probe.changed)
    assert agent.metrics is None and callback_of(trainer, GradwatchCallback)._hook is None  # closed at the end


def test_guard_skips_the_nan_step_and_training_goes_on(tmp_path):
    ex = load_example()
    probe = GradProbe()  # after PoisonGradient: sees the NaN gradient, snapshots the parameters
    trainer = ex.build(ex.parse(["--max-steps", "5", "--nan-at-step", "2"]), str(tmp_path), probe)
    trainer.train()
    assert trainer.state.global_step == 5
    assert probe.changed == [True, True, False, True, True]  # the NaN step left every parameter bitwise as it was
    assert [r["skipped"] for r in callback_of(trainer, ex.StepLog).steps] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def quiet_args(tmp_path: Path, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)


def test_no_double_instrumentation_when_the_user_attached_an_agent(tmp_path):
    ex = load_example()
    model = ex.tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    user_agent = HealthAgent(model, opt, metrics_port=None, activation_every=0)
    user_agent.wrap(opt)
    callback = GradwatchCallback(metrics_port=None)
    trainer = Trainer(model=model, args=quiet_args(tmp_path, 3), train_dataset=ex.CountingDataset(),
                      optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    assert callback.agent is user_agent and callback._hook is None  # adopted; no second agent, no hook
    assert user_agent.step_count == 3  # each step measured once


def test_adapter_fails_open(tmp_path, caplog):
    """Everything in the model frozen, the optimizer trains a tensor outside it: the agent refuses the
    model ('no trainable parameters'); the adapter logs that once and the Trainer trains on."""
    ex = load_example()
    model = ex.tiny_gpt2().requires_grad_(False)
    outside = torch.zeros(1, requires_grad=True)
    callback = GradwatchCallback(metrics_port=None)
    trainer = Trainer(model=model, args=quiet_args(tmp_path, 3), train_dataset=ex.CountingDataset(),
                      optimizers=(torch.optim.SGD([outside], lr=0.1), None), callbacks=[callback],
                      compute_loss_func=lambda outputs, labels, num_items_in_batch=None: (outside - 1).pow(2).sum())
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        trainer.train()
    assert trainer.state.global_step == 3 and float(outside.detach()) > 0.1  # trained, uninstrumented
    assert callback.agent is None
    assert [r.getMessage() for r in caplog.records].count(
        "gradwatch hf adapter: attaching the agent failed; training goes on: "
        "LayoutError('the model has no trainable parameters on any rank (every parameter has requires_grad=False)')") == 1


def test_bad_configuration_is_rejected_at_construction():
    with pytest.raises(ValidationError, match="activation_every"):
        GradwatchCallback(activation_every=-1)


def test_trainer_clipping_is_reported(tmp_path, caplog):
    """Default max_grad_norm=1.0: the Trainer clips before the step, so the agent sees clipped norms,
    and says so once."""
    ex = load_example()
    callback = GradwatchCallback(metrics_port=None)
    trainer = Trainer(model=ex.tiny_gpt2(), args=quiet_args(tmp_path, 2), train_dataset=ex.CountingDataset(),
                      callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        trainer.train()
    assert callback.agent.step_count == 2 and callback.agent.last_stats.grad_norm <= 1.0 + 1e-5
    assert sum("gradwatch measures clipped norms" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.multiproc
def test_ddp_two_ranks_loss_and_norm_as_the_trainer_logs(tmp_path):
    """torchrun runs the example on 2 CPU ranks (gloo), 2 accumulated micro-batches per step: the
    Trainer averages tokens across devices, and the agent's cross-rank loss and norm still equal
    what the Trainer logged, identically on both ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           "--max-steps", "3", "--accumulate", "2", "--mode", "observe", "--report", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [0, 1, 2]
    for a, b in zip(*ranks):
        assert a["gradwatch_loss"] == pytest.approx(a["trainer_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(a["trainer_grad_norm"], rel=1e-5)
        assert (a["gradwatch_loss"], a["grad_norm"]) == (b["gradwatch_loss"], b["grad_norm"])


def test_fp16_accelerated_optimizer_overflow_and_guard_skip_keep_the_scaler_consistent():
    """accelerate's fp16 optimizer (its step runs scaler.step and scaler.update), routed, guard mode,
    stepped as the Trainer does (unscale_ for clipping, then step): a real NaN step is skipped by the
    agent and the scaler stays usable; an fp16 overflow (finite loss, inf scaled gradients) is the
    scaler's own skip, not a non-finite step."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), scaler=scaler)
    agent = HealthAgent(model, opt, mode="guard", metrics_port=None, activation_every=0)
    losses: list[torch.Tensor] = []
    agent.wrap(opt, loss=lambda: losses.pop() if losses else None)

    def train_step(x: torch.Tensor) -> bool:
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(x).pow(2).mean()
        losses.append(loss.detach())
        scaler.scale(loss).backward()
        scaler.unscale_(opt.optimizer)  # what the Trainer's gradient clipping does
        opt.step()
        opt.zero_grad()
        return any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    x = torch.randn(16, 4)
    assert train_step(x)
    assert not train_step(torch.full((16, 4), float("inf")))  # real non-finite: the guard skips
    assert agent.state.skipped_steps_total["nonfinite"] == 1 and agent.nan_origin is not None
    assert train_step(x)  # without update() after the skip, unscale_ raised "already been called"
    scaler.update(2.0**127)  # the next scaled gradients overflow fp32; the loss stays finite
    nonfinite = agent.state.nonfinite_steps_total
    assert not train_step(x * 100)
    assert opt.step_was_skipped and scaler.get_scale() < 2.0**127  # GradScaler skipped it and backed off
    assert agent.state.skipped_steps_total["amp_overflow"] == 1 and agent.state.nonfinite_steps_total == nonfinite
    assert agent.state.skipped_steps_total["nonfinite"] == 1 and agent.last_stats.extra.get("amp_overflow")
    assert train_step(x) and agent.step_count == 5
    agent.close()
