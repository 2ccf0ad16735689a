"""A Lightning training run with gradwatch attached: one callback, nothing else changes.

    python examples/train_lightning.py                                  # one CPU process
    torchrun --nproc-per-node 2 examples/train_lightning.py --devices 2  # DDP on CPU (gloo)
    python examples/train_lightning.py --nan-at-step 5 --mode guard     # a poisoned batch is skipped

A tiny randomly initialised regressor on synthetic data. Each optimizer step prints Lightning's
logged loss beside what gradwatch measured; `--report DIR` also writes DIR/rank{R}.json (the tests
read it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.agent.integrations.lightning import GradwatchCallback


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05, nan_at_step: Optional[int] = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr, self.nan_at_step = lr, nan_at_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_at_step and self.global_rank == self.trainer.world_size - 1:
            x = x * float("nan")  # a corrupt batch on the last rank: DDP spreads NaN gradients to all
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def synthetic_data(samples: int = 512, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(samples, 1, generator=g)
    return TensorDataset(x, y)


def digest(module: nn.Module) -> str:
    """Bitwise fingerprint of the parameters (to show a skipped step changed nothing)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class StepLog(pl.Callback):
    """Per optimizer step: Lightning's logged loss (this rank's, averaged over accumulated batches)
    beside the loss gradwatch received on this rank, and what the agent measured and decided."""

    def __init__(self, gradwatch: GradwatchCallback, report: Optional[Path]) -> None:
        self.gradwatch, self.report = gradwatch, report
        self.steps: list[dict[str, Any]] = []
        self._window: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._window.append(float(trainer.callback_metrics["train_loss"]))
        agent = self.gradwatch.agent
        if agent is None or agent.step_count == len(self.steps):
            return  # an accumulating micro-batch: no optimizer step yet
        stats = agent.last_stats
        assert stats is not None
        row = {
            "step": stats.step,
            "lightning_loss": sum(self._window) / len(self._window),
            "gradwatch_loss": stats.ranks[trainer.global_rank].loss,
            "loss_mean": stats.loss_mean,
            "grad_norm": stats.grad_norm,
            "layers": list(stats.layers),
            "layer_grad_norm": stats.layer_grad_norm,
            "skipped": sum(agent.state.skipped_steps_total.values()),
            "params": digest(pl_module),
        }
        self.steps.append(row)
        self._window = []
        if trainer.global_rank == 0:
            print(f"step {row['step']:3d}  lightning loss {row['lightning_loss']:.4f}  gradwatch loss "
                  f"{row['gradwatch_loss']:.4f}  grad norm {row['grad_norm']:.4g}  skipped so far {row['skipped']}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is not None:
            self.report.mkdir(parents=True, exist_ok=True)
            (self.report / f"rank{trainer.global_rank}.json").write_text(json.dumps({"steps": self.steps}))


def build(args: argparse.Namespace, *extra: pl.Callback) -> tuple[pl.Trainer, TinyRegressor, DataLoader, StepLog]:
    torch.manual_seed(args.seed)
    model = TinyRegressor(nan_at_step=args.nan_at_step)
    gradwatch = GradwatchCallback(job="example-lightning", mode=args.mode, metrics_port=args.metrics_port,
                                  activation_every=5, guard_warmup_steps=5)
    steplog = StepLog(gradwatch, Path(args.report) if args.report else None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps, accumulate_grad_batches=args.accumulate, callbacks=[gradwatch, steplog, *extra],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    loader = DataLoader(synthetic_data(), batch_size=16, shuffle=False)
    return trainer, model, loader, steplog


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--mode", choices=["observe", "guard"], default="guard")
    p.add_argument("--nan-at-step", type=int, default=None, help="feed a NaN batch on the last rank at this step")
    p.add_argument("--metrics-port", type=int, default=None, help="rank 0 serves Prometheus metrics here (0: any free port)")
    p.add_argument("--report", default=None, help="write DIR/rank{R}.json with every step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trainer, model, loader, _ = build(parse(argv))
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
