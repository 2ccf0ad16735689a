"""The demo's training job, one process per rank under torchrun (gloo, CPU):

    torchrun --standalone --nproc-per-node 2 -m gradwatch.demo.worker --scenario exploding --events run.jsonl

A plain DDP loop with the agent in guard mode. Rank 0 serves Prometheus metrics (scraped by Prometheus,
or by the aggregator itself in the embedded stack), takes remediation commands from the aggregator,
and writes what happens to the event stream (events.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..agent import HealthAgent, StepStats
from ..agent.health_agent import HALT_EXIT_CODE
from .catalog import SLOW_START
from .events import EventWriter
from .scenarios import SCENARIOS, batch, build


EVAL_EVERY = 10


def _worst_layer(stats: StepStats) -> Optional[str]:
    """The layer with the largest gradient norm; a non-finite one counts as the largest."""
    if not stats.layers:
        return None
    return max(zip(stats.layers, stats.layer_grad_norm), key=lambda item: math.inf if not math.isfinite(item[1]) else item[1])[0]


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=SCENARIOS, default="exploding")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seconds-per-step", type=float, default=0.25, help="pace, so second-scale rules see the run unfold")
    p.add_argument("--fault-step", type=int, default=20, help="nan: the step whose forward pass turns NaN on rank 1")
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--job", default="gradwatch-demo")
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--aggregator-url", help="take remediation commands from this aggregator (token: GRADWATCH_AGGREGATOR_TOKEN)")
    p.add_argument("--linger", type=float, default=0.0, help="seconds to keep serving metrics after the last step")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = build(args.scenario)
    poisoned = {"now": False}
    if setup.poison is not None:  # before the agent's hooks, so the agent sees the module's NaN output
        setup.poison.register_forward_hook(lambda _m, _i, out: out * float("nan") if poisoned["now"] and rank == 1 else out)
    model = DDP(setup.model)
    optimizer = setup.make_optimizer(model)
    agent = HealthAgent(
        model, optimizer, job=args.job, mode="guard",
        metrics_port=args.metrics_port if rank == 0 else None, metrics_addr="127.0.0.1",
        activation_every=5, update_ratio_every=5, aggregator_url=args.aggregator_url, command_poll_s=0.2,
    )
    events = EventWriter(args.events) if rank == 0 else None
    if events is not None:
        events.write("start", job=args.job, scenario=args.scenario, world_size=world, layers=list(agent.layers),
                     metrics_port=agent.metrics_port, time=time.time())

    slow_steps, slow_seconds = SLOW_START.get(args.scenario, (0, args.seconds_per_step))
    halted = False
    try:
        for step in range(args.steps):
            started = time.time()
            poisoned["now"] = step == args.fault_step
            x, y = batch(setup, step, rank, world)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            skipped, clipped, applied = sum(agent.state.skipped_steps_total.values()), agent.state.clipped_steps_total, len(agent.commands_applied)
            agent.step(optimizer, loss=loss)
            optimizer.zero_grad()
            if events is not None:
                _record(events, agent, optimizer, step, skipped, clipped, applied)
            if step % EVAL_EVERY == 0:  # held-out loss, the same on every rank (the overfitting rule's input)
                with torch.no_grad():
                    agent.observe_eval(nn.functional.mse_loss(model(setup.inputs[-64:]), setup.targets[-64:]))
            pace = slow_seconds if step < slow_steps else args.seconds_per_step
            time.sleep(max(0.0, pace - (time.time() - started)))
    except SystemExit as exc:  # a `halt` command: the agent checkpoints (on_halt) and exits on every rank
        halted = exc.code == HALT_EXIT_CODE
        raise
    finally:
        if events is not None:
            agent.flush()
            last = agent.last_stats
            events.write("end", steps=agent.step_count, final_loss=last.loss_mean if last else None,
                         nan_origin=dataclasses.asdict(agent.nan_origin) if agent.nan_origin else None, halted=halted, time=time.time())
        time.sleep(args.linger)  # the last values stay up for a few scrapes
        agent.close()
        if events is not None:
            events.close()
        if not halted:
            dist.destroy_process_group()


def _record(events: EventWriter, agent: HealthAgent, optimizer: torch.optim.Optimizer, step: int,
            skipped_before: int, clipped_before: int, applied_before: int) -> None:
    for cmd in agent.commands_applied[applied_before:]:
        events.write("command", step=cmd.step, kind=cmd.kind, value=cmd.value, outcome=cmd.outcome, time=time.time())
    stats = agent.last_stats
    if stats is None or stats.step != step:
        return
    events.write(
        "step", step=step, time=time.time(), loss=stats.loss_mean, grad_norm=stats.grad_norm,
        layer_grad_norm=stats.layer_grad_norm, worst_layer=_worst_layer(stats),
        lr=float(optimizer.param_groups[0]["lr"]), clip_bound=agent.state.guard_bound,
        skipped=sum(agent.state.skipped_steps_total.values()) > skipped_before,
        clipped=agent.state.clipped_steps_total > clipped_before,
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
