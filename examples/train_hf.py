"""A Hugging Face Trainer run with gradwatch attached: one callback, nothing else changes.

    HF_HUB_OFFLINE=1 python examples/train_hf.py
    HF_HUB_OFFLINE=1 python examples/train_hf.py --nan-at-step 4   # a NaN gradient step is skipped
    HF_HUB_OFFLINE=1 torchrun --nproc-per-node 2 examples/train_hf.py

A 2-layer GPT-2 with 32-wide embeddings, randomly initialised from a config built here (nothing is
downloaded), learns to continue counting sequences. Each optimizer step prints the Trainer's logged
loss beside what gradwatch measured; `--report DIR` also writes DIR/rank{R}.json (the tests read it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradwatch.agent.integrations.hf import GradwatchCallback

VOCAB, SEQ = 64, 16


class CountingDataset(Dataset):
    """Sequences start, start+1, ... (mod VOCAB): a pattern a tiny model learns in a few steps."""

    def __init__(self, samples: int = 256, seed: int = 0) -> None:
        starts = torch.randint(0, VOCAB, (samples, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


class PoisonGradient(TrainerCallback):
    """Simulate a corrupt step: a NaN in one gradient right before the optimizer step, on the last
    rank only (after DDP's all-reduce: a rank-local fault, such as a bit flip)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step and args.process_index == args.world_size - 1:
            next(model.parameters()).grad.view(-1)[0] = float("nan")


class StepLog(TrainerCallback):
    """Per optimizer step: the Trainer's logged loss beside the loss and statistics gradwatch saw."""

    def __init__(self, gradwatch: GradwatchCallback, report: Optional[Path]) -> None:
        self.gradwatch, self.report = gradwatch, report
        self.steps: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        agent = self.gradwatch.agent
        if not logs or "loss" not in logs or agent is None or agent.last_stats is None:
            return
        stats = agent.last_stats
        row = {
            "step": stats.step,
            "trainer_loss": logs["loss"],
            "gradwatch_loss": stats.loss_mean,
            "grad_norm": stats.grad_norm,
            "trainer_grad_norm": logs.get("grad_norm"),
            "layers": list(stats.layers),
            "layer_grad_norm": stats.layer_grad_norm,
            "skipped": sum(agent.state.skipped_steps_total.values()),
        }
        self.steps.append(row)
        if state.is_world_process_zero:
            print(f"step {row['step']:3d}  trainer loss {row['trainer_loss']:.4f}  gradwatch loss "
                  f"{row['gradwatch_loss']:.4f}  grad norm {row['grad_norm']:.4g}  skipped so far {row['skipped']}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.report is not None:
            self.report.mkdir(parents=True, exist_ok=True)
            (self.report / f"rank{args.process_index}.json").write_text(json.dumps({"steps": self.steps}))


def build(args: argparse.Namespace, output_dir: str, *extra: TrainerCallback) -> Trainer:
    # gradwatch clips (at 1.0, and adaptive spikes) in place of the Trainer, so it sees raw norms.
    # StepLog sets each step's statistics beside the Trainer's log line of that step, so every step is
    # read as it happens (combine_seconds=0) rather than combined with the next ones across ranks.
    gradwatch = GradwatchCallback(job="example-hf", mode=args.mode, metrics_port=args.metrics_port,
                                  activation_every=5, guard_warmup_steps=5, guard_max_norm=1.0, combine_seconds=0)
    callbacks: list[TrainerCallback] = [gradwatch, StepLog(gradwatch, Path(args.report) if args.report else None)]
    if args.nan_at_step is not None:
        callbacks.append(PoisonGradient(args.nan_at_step))
    callbacks.extend(extra)
    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accumulate, learning_rate=3e-3, weight_decay=0.01,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=args.seed, dataloader_num_workers=0,
    )
    return Trainer(model=tiny_gpt2(args.seed), args=training_args, train_dataset=CountingDataset(), callbacks=callbacks)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--mode", choices=["observe", "guard"], default="guard")
    p.add_argument("--nan-at-step", type=int, default=None, help="put a NaN in a gradient at this step")
    p.add_argument("--metrics-port", type=int, default=None, help="rank 0 serves Prometheus metrics here (0: any free port)")
    p.add_argument("--report", default=None, help="write DIR/rank{R}.json with every step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse(argv)
    with tempfile.TemporaryDirectory() as output_dir:
        build(args, output_dir).train()


if __name__ == "__main__":
    main()
