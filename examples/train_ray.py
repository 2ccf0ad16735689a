"""Ray Train with the gradwatch agent: a TorchTrainer whose workers train a small model with DDP.

    python examples/train_ray.py --workers 2 --steps 50
    GRADWATCH_AGGREGATOR_TOKEN=... python examples/train_ray.py --aggregator http://127.0.0.1:9095

The only gradwatch lines are `attach(...)` (rank, world size and job name come from Ray's context),
`agent.step` in place of `optimizer.step`, and `agent.close`. World rank 0 serves the metrics (its
port is printed); with `--aggregator`, commands sent to the job apply on every worker at one step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from typing import Any, Optional

import torch
from torch import nn


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker, inside the process group TorchTrainer set up (gloo on CPU)."""
    import ray.train
    import ray.train.torch
    import ray.util

    from gradwatch.agent.integrations.ray_train import attach

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05))
    agent = attach(model, optimizer, **config.get("gradwatch", {}))
    if rank == 0 and agent.metrics_port:  # world rank 0 may run on any node of the cluster: name that node
        node = ray.util.get_node_ip_address()
        print(f"gradwatch metrics: http://{node}:{agent.metrics_port}/metrics", flush=True)

    out: Optional[str] = config.get("out")
    data = torch.Generator().manual_seed(1 + rank)  # each worker its own shard
    target = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    history = []
    for step in range(config.get("steps", 50)):
        x = torch.randn(32, 8, generator=data)
        loss = nn.functional.mse_loss(model(x), x @ target)
        loss.backward()
        agent.step(optimizer, loss=loss)
        optimizer.zero_grad()
        st = agent.last_stats
        # the newest step read so far: across workers, steps are combined and read together (combine_seconds)
        history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], "published": st.step if st else None,
                        "grad_norm": st.grad_norm if st else None, "loss": st.loss_mean if st else None})
        if out and rank == 0 and step == 0:
            open(os.path.join(out, "training"), "w").close()  # for a test waiting to send a command
        applied = agent.commands_applied
        if config.get("stop_after_command") and applied and step >= applied[-1].step + 3:
            break  # every worker holds the same list, so every worker stops at the same step
        time.sleep(config.get("seconds_per_step", 0.0))

    scrape = None
    if agent.metrics_port:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as r:
            scrape = r.read().decode()
    if out:
        result = {"rank": rank, "world": context.get_world_size(), "job": agent.config.job,
                  "metrics_port": agent.metrics_port, "scrape": scrape, "history": history,
                  "commands": [(c.step, c.kind, c.value, c.outcome) for c in agent.commands_applied],
                  "params": [p.detach().flatten().tolist() for p in model.parameters()]}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    ray.train.report({"loss": history[-1]["loss"], "steps": len(history)})
    agent.close()


def build_trainer(config: dict[str, Any], workers: int, storage_path: str, name: str = "gradwatch-ray") -> Any:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seconds-per-step", type=float, default=0.1)
    parser.add_argument("--aggregator", help="take commands from this aggregator (token: GRADWATCH_AGGREGATOR_TOKEN)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=args.workers)
    settings = {"aggregator_url": args.aggregator} if args.aggregator else {}
    config = {"steps": args.steps, "seconds_per_step": args.seconds_per_step, "gradwatch": settings}
    result = build_trainer(config, args.workers, tempfile.mkdtemp(prefix="gradwatch-ray-")).fit()
    print(f"done: {result.metrics}")


if __name__ == "__main__":
    main()
