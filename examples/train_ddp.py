"""A real DDP training job with the gradwatch agent attached.

    torchrun --nproc-per-node 2 examples/train_ddp.py            # diverges, NaN origin named
    torchrun --nproc-per-node 2 examples/train_ddp.py --healthy  # standardised target: trains fine
    python examples/train_ddp.py                                 # one process works too

While it runs, rank 0 serves Prometheus metrics (the port is printed) and writes every measured step
to out/train_ddp.jsonl. The only gradwatch lines are the import, the constructor, `agent.step` in
place of `optimizer.step`, and `agent.close`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwatch.agent import HealthAgent


def regression_data(n_samples: int = 1000, n_features: int = 10, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """make_regression-style data: the target is unscaled (|y| in the hundreds), so plain SGD diverges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=g)
    y = x @ (100 * torch.rand(n_features, 1, generator=g)) + 0.1 * torch.randn(n_samples, 1, generator=g)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--healthy", action="store_true", help="standardise the target (the fix)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="out")
    parser.add_argument("--seconds-per-step", type=float, default=0.5, help="pace, so the 1 s rule evaluations see the run unfold")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    x, y = regression_data()
    if args.healthy:
        y = (y - y.mean()) / y.std()
    torch.manual_seed(11)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(10, 15))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(15, 1))
    if distributed:
        model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    agent = HealthAgent(
        model, optimizer, job="example-" + ("healthy" if args.healthy else "exploding"),
        jsonl_path=os.path.join(args.out, "train_ddp.jsonl"), activation_every=5,
    )
    # gradwatch's alert rules, evaluated in this process (no Prometheus needed): second-scale windows
    # for a demo that lasts seconds (examples/demo_rules.yaml), alerts logged as they fire.
    watcher = agent.watch_rules(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_rules.yaml"))
    if rank == 0 and agent.metrics_port:
        print(f"metrics: http://127.0.0.1:{agent.metrics_port}/metrics")

    batch = 32
    g = torch.Generator().manual_seed(0)
    printed = -1  # across ranks, measured steps are read about a second at a time: print each once
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x) - batch * world + 1, batch * world):
            idx = order[start + rank * batch : start + (rank + 1) * batch]
            started = time.time()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            agent.step(optimizer, loss=loss)
            optimizer.zero_grad()
            time.sleep(max(0.0, args.seconds_per_step - (time.time() - started)))
            st = agent.last_stats
            if rank == 0 and st is not None and st.step % 5 == 0 and st.step != printed:
                printed = st.step
                worst = max(range(len(st.layers)), key=lambda i: st.layer_grad_norm[i])
                print(f"epoch {epoch} step {st.step:3d}  loss {st.loss_mean:12.4g}  grad-norm {st.grad_norm:10.4g}  "
                      f"largest layer {st.layers[worst]} ({st.layer_grad_norm[worst]:.3g})")

    agent.close()  # reads the last steps, still pending across ranks, and drains the publisher
    if watcher is not None:
        fired = sorted({c.alert.labels["alertname"] for c in watcher.history if c.after == "firing"})
        print(f"alerts raised in process: {', '.join(fired) or 'none'}")
    if rank == 0:
        origin = agent.nan_origin
        if origin is None:
            print(f"done: {agent.step_count} steps, no non-finite value; final loss {agent.last_stats.loss_mean:.4g}")
        else:
            ranks = ", ".join(map(str, origin.ranks)) or "all"
            print(f"done: {agent.step_count} steps. First non-finite value: step {origin.step}, {origin.kind} "
                  f"of layer {origin.layer!r}, rank(s) {ranks}. Fixes: standardise the target (--healthy), "
                  f"lower the learning rate, or clip gradients.")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
