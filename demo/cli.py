"""`gradwatch demo`'s arguments; light on purpose (the `gradwatch` command line builds every
sub-command's parser, and must not import torch to do so)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .catalog import DESCRIPTIONS, SCENARIOS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=SCENARIOS, default="exploding",
                   help="; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items()))
    p.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    p.add_argument("--seconds-per-step", type=float, default=0.25,
                   help="pace the job so the rules' second-scale windows see it unfold (default 0.25)")
    p.add_argument("--stack", choices=("auto", "full", "embedded"), default="auto",
                   help="full: Prometheus + Alertmanager + aggregator; embedded: no Prometheus; auto: full if installed")
    p.add_argument("--out", type=Path, default=Path("gradwatch-demo"), help="plots and the run's logs go here (default ./gradwatch-demo)")
    p.add_argument("--summary", type=Path, help="also write the run's summary as JSON here (schema: docs/demo.md)")
    p.add_argument("--job", help="the job label (default demo-<scenario>)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--metrics-port", type=int, help="rank 0's metrics port (default: a free one)")


def run(args: argparse.Namespace) -> int:
    from .run import main

    return main(args)
