"""Ray Train: the agent inside `ray.train.torch.TorchTrainer` workers.

    def train_loop_per_worker(config):
        model = ray.train.torch.prepare_model(build_model())      # DDP over Ray's process group
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        agent = gradwatch.agent.integrations.ray_train.attach(model, optimizer)
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            agent.step(optimizer, loss=loss)
            optimizer.zero_grad()
        agent.close()

TorchTrainer initialises torch.distributed with rank = Ray's world rank on every worker, so the
core's rules hold unchanged: world rank 0 alone serves metrics and polls the aggregator, and a
command rides the step's all-reduce to every worker. This adapter only names the job after Ray's
run (the experiment name) unless a job is given, and refuses a worker whose process group
disagrees with Ray's context - the one mistake that would make two workers both export, or none.

The only module of gradwatch that imports ray.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..health_agent import HealthAgent, attached_agent


def job_name(experiment: str) -> str:
    """Ray's experiment name as a Prometheus label value (AgentConfig's job rule)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.:\-/]", "_", experiment)[:128]
    return cleaned or "ray-train"


def attach(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, **settings: Any) -> HealthAgent:
    """A HealthAgent for this Ray Train worker; `settings` are AgentConfig fields (they override
    `GRADWATCH_*` variables, which override the defaults). Called twice, it returns the first."""
    import ray.train

    existing = attached_agent(model) or (attached_agent(optimizer) if optimizer is not None else None)
    if existing is not None:
        return existing
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"gradwatch: Ray Train worker {rank} of {world} has no torch.distributed process group; "
                "use ray.train.torch.TorchTrainer (it creates one) before attaching"
            )
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise RuntimeError(
                f"gradwatch: torch.distributed says rank {dist.get_rank()} of {dist.get_world_size()} but Ray Train "
                f"says world rank {rank} of {world}; attach with the process group TorchTrainer created"
            )
    if "job" not in settings and "GRADWATCH_JOB" not in os.environ:  # an explicit name wins
        settings["job"] = job_name(context.get_experiment_name())
    return HealthAgent.from_env(model, optimizer, **settings)
