"""A plain DDP training script that knows nothing of gradwatch (no import, no call).

    gradwatch run --auto-attach --job plain -- torchrun --nproc-per-node 2 examples/train_unmodified.py
    gradwatch run --auto-attach --mode guard -- torchrun --nproc-per-node 2 examples/train_unmodified.py --nan-step 5

`--fsdp2` shards the model with FSDP2 (`fully_shard`) instead of DDP. `--nan-step N` feeds rank 1 a NaN batch at step N: untouched, the parameters turn NaN on every rank;
under `--mode guard` that one step is skipped on every rank. `--out DIR` writes each rank's final
parameters to DIR/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seconds-per-step", type=float, default=0.0, help="pace, so a scraper sees the run unfold")
    parser.add_argument("--nan-step", type=int, default=-1, help="feed rank 1 a NaN batch at this step")
    parser.add_argument("--out", help="write each rank's final parameters here")
    parser.add_argument("--fsdp2", action="store_true", help="shard with fully_shard instead of DDP")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    if args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        model = fully_shard(model)
    else:
        model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)

    data = torch.Generator().manual_seed(1 + rank)  # each rank its own shard
    target = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        started = time.time()
        x = torch.randn(32, 8, generator=data)
        y = x @ target
        if step == args.nan_step and rank == 1:
            x = x * float("nan")
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        time.sleep(max(0.0, args.seconds_per_step - (time.time() - started)))
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4g}", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]  # FSDP2: gather
        params = [p.detach().flatten().tolist() for p in full]
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world": world, "params": params}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
