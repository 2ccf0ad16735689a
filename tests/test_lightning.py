"""The Lightning adapter on real Lightning fits (examples/train_lightning.py): statistics every
optimizer step with the loss Lightning computed, the guard skipping a NaN step on both DDP ranks,
no double instrumentation, fail-open."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from gradwatch.agent import HealthAgent, attached_agent  # noqa: E402
from gradwatch.agent.integrations.lightning import GradwatchCallback  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lightning.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_lightning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GradProbe(pl.Callback):
    """Independent per-parameter gradient norms, taken where the agent is about to measure."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append([float(p.grad.norm()) for p in pl_module.parameters()])


def test_statistics_every_step_with_lightnings_loss():
    ex = load_example()
    probe = GradProbe()
    trainer, model, loader, steplog = ex.build(ex.parse(["--max-steps", "6", "--accumulate", "2", "--mode", "observe"]), probe)
    trainer.fit(model, loader)

    assert trainer.global_step == 6
    agent = trainer.callbacks[0].agent
    assert agent.step_count == 6  # one agent step per optimizer step, not per micro-batch
    assert [row["step"] for row in steplog.steps] == list(range(6))
    for row, ref in zip(steplog.steps, probe.norms):
        # the loss Lightning logged (averaged over the 2 accumulated batches) is the one the agent got
        assert row["gradwatch_loss"] == pytest.approx(row["lightning_loss"], rel=1e-6)
        assert row["layers"] == [n for n, _ in model.named_parameters()]
        assert row["layer_grad_norm"] == pytest.approx(ref, rel=1e-5)
    assert len({row["params"] for row in steplog.steps}) == 6  # every step updated the model
    assert agent.metrics is None  # closed at the end of fit


def test_guard_skips_the_nan_step_and_training_goes_on():
    ex = load_example()
    trainer, model, loader, steplog = ex.build(ex.parse(["--max-steps", "6", "--nan-at-step", "3"]))
    trainer.fit(model, loader)
    rows = steplog.steps
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["params"] == rows[2]["params"]  # bitwise unchanged by the skipped step
    assert rows[4]["params"] != rows[3]["params"] and rows[5]["params"] != rows[4]["params"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.callbacks[0].agent.nan_origin.step == 3



def test_fp16_gradscaler_loss_and_norms_are_unscaled():
    """16-mixed with a real GradScaler (on CPU: fp16 autocast): the routed step runs inside
    scaler.step after Lightning's unscale; the loss the agent gets is divided back by the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    ex = load_example()
    probe = GradProbe()
    _, model, loader, steplog = ex.build(ex.parse(["--max-steps", "4", "--mode", "observe"]))
    gradwatch = GradwatchCallback(metrics_port=None, activation_every=0)
    steplog.gradwatch = gradwatch
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[gradwatch, steplog, probe],
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    assert gradwatch.agent.step_count == 4 and scaler.get_scale() == 1024.0  # no overflow, no skipped step
    for row, ref in zip(steplog.steps, probe.norms):
        assert row["gradwatch_loss"] == pytest.approx(row["lightning_loss"], rel=1e-6)  # not 1024x
        assert row["layer_grad_norm"] == pytest.approx(ref, rel=1e-5)

class UserAttached(pl.LightningModule):
    """A module whose author attached gradwatch by hand, as the README shows for frameworks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.user_agent = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        self.user_agent = HealthAgent(self, opt, metrics_port=None, activation_every=0)
        return self.user_agent.wrap(opt)


def tiny_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def quiet_trainer(callback: pl.Callback, steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_no_double_instrumentation_when_the_user_attached_an_agent():
    module, callback = UserAttached(), GradwatchCallback(metrics_port=None)
    trainer = quiet_trainer(callback, 5)
    trainer.fit(module, tiny_loader())
    assert callback.agent is module.user_agent  # adopted, no second agent
    assert attached_agent(trainer.optimizers[0]) is module.user_agent
    assert module.user_agent.step_count == 5  # each step measured once
    assert module.user_agent.last_stats.loss_mean is not None  # the user's wrap got the closure's loss


class FrozenModule(pl.LightningModule):
    """Every module parameter frozen; the optimizer trains a tensor outside the module, which the agent
    rejects ('no trainable parameters'): the adapter must log it and let training run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1).requires_grad_(False)
        self.outside = torch.zeros(1, requires_grad=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x) + self.outside, y)

    def configure_optimizers(self):
        return torch.optim.SGD([self.outside], lr=0.1)


def test_adapter_fails_open(caplog):
    module, callback = FrozenModule(), GradwatchCallback(metrics_port=None)
    trainer = quiet_trainer(callback, 4)
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        trainer.fit(module, tiny_loader())
    assert trainer.global_step == 4 and float(module.outside.detach()) != 0.0  # trained, uninstrumented
    assert callback.agent is None
    assert [r.getMessage() for r in caplog.records].count(
        "gradwatch lightning adapter: attaching the agent failed; training goes on: "
        "LayoutError('the model has no trainable parameters on any rank (every parameter has requires_grad=False)')") == 1


def test_bad_configuration_is_rejected_at_construction():
    with pytest.raises(ValidationError, match="mode"):
        GradwatchCallback(mode="panic")


@pytest.mark.multiproc
def test_ddp_two_ranks_take_the_same_decision(tmp_path):
    """torchrun runs the example on 2 CPU ranks (gloo), 2 accumulated batches per step, a NaN batch
    on rank 1 at step 4: both ranks skip exactly that step and end bitwise identical."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           "--devices", "2", "--accumulate", "2", "--max-steps", "7", "--nan-at-step", "4", "--report", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
    for rows in ranks:
        assert [r["skipped"] for r in rows] == [0, 0, 0, 0, 1, 1, 1]
        assert rows[4]["params"] == rows[3]["params"] and rows[5]["params"] != rows[4]["params"]
        for row in rows:  # each rank's own loss reached the agent as Lightning computed it
            assert row["gradwatch_loss"] == pytest.approx(row["lightning_loss"], rel=1e-6, nan_ok=True)
    for a, b in zip(*ranks):
        assert a["params"] == b["params"]  # identical replicas at every step
        assert a["loss_mean"] == pytest.approx(b["loss_mean"], nan_ok=True)  # both hold the reduced mean
        if a["step"] != 4:
            assert a["loss_mean"] == pytest.approx((a["lightning_loss"] + b["lightning_loss"]) / 2, rel=1e-6)
    assert ranks[1][4]["lightning_loss"] != ranks[1][4]["lightning_loss"]  # rank 1's batch was the NaN one


class _Plain(pl.LightningModule):
    """A plain regression module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_clipping_is_reported(caplog):
    callback = GradwatchCallback(metrics_port=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[callback], logger=False,
                         gradient_clip_val=1e-3, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        trainer.fit(_Plain(), tiny_loader())
    assert callback.agent.step_count == 3 and callback.agent.last_stats.grad_norm <= 1e-3 * (1 + 1e-5)
    assert sum("gradwatch measures clipped norms" in r.getMessage() for r in caplog.records) == 1



def test_fp16_overflow_skipped_by_gradscaler_leaves_no_stale_loss():
    """16-mixed, guard mode, a NaN batch: GradScaler finds inf gradients and skips the step itself,
    without calling the routed step. Its NaN loss must not leak into the next step's loss (a false
    'first non-finite loss', and a healthy step skipped by the guard)."""
    from lightning.pytorch.plugins import MixedPrecision

    ex = load_example()
    _, model, loader, steplog = ex.build(ex.parse(["--max-steps", "5", "--nan-at-step", "2"]))
    gradwatch = GradwatchCallback(metrics_port=None, activation_every=0, mode="guard", guard_warmup_steps=5)
    steplog.gradwatch = gradwatch
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, callbacks=[gradwatch, steplog],
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    agent = gradwatch.agent
    assert scaler.get_scale() < 1024.0  # GradScaler backed off: it skipped the NaN step itself
    assert agent.step_count == 4 and agent.nan_origin is None
    assert sum(agent.state.skipped_steps_total.values()) == 0 and agent.state.nonfinite_steps_total == 0
    assert all(r["gradwatch_loss"] is not None and r["gradwatch_loss"] == r["gradwatch_loss"] for r in steplog.steps)
