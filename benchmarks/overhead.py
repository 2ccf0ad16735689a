"""Agent overhead against a plain training step and against peers, side by side in one run.

    .venv/bin/python benchmarks/overhead.py [--models mlp gpt] [--wraps ddp fsdp2] [--rounds 3] [--cycles 5]
        [--compile-backend inductor] [--json out.json]
    .venv/bin/python benchmarks/overhead.py --world 4 --wraps hsdp fsdp2+tp ...

Gloo ranks on this machine's CPU (torch.multiprocessing): 2 by default; the 2-D layouts need
`--world 4`: hsdp is fully_shard on a 2 x 2 (replicate, shard) mesh, fsdp2+tp tensor parallelism over
2 ranks (the mlp's Linear pairs column- then row-wise) inside FSDP2 over the other 2 (mlp only). For every model and wrapping, every
configuration's model, optimizer and monitor are built side by side; blocks of `--steps` steps are
then taken in turn (configuration A's block, B's block, ...), `--cycles` times, and all of that
`--rounds` times with fresh runners and a rotated order. Each block is paired with the baseline's
block of the same cycle, so a ratio compares steps taken seconds apart, and the report gives:

  ratio      median over blocks of (configuration's step time / baseline's, same cycle), and its quartiles;
             the compiled configurations' baseline is the compiled model (`paired_with` in the JSON)
  +ms/step   median of the paired differences: the time the configuration adds to a step
  cpu ratio  the same ratio for CPU seconds summed over the ranks (every thread; waiting not counted)
  monitor ms the monitor's own calls after backward(), timed around them on each rank, the
             optimizer's step excluded (wall; its CPU time in the JSON): a direct, low-noise
             measure of added time for monitors without forward/backward hooks (grad, guard,
             peer-loop); hooks (activations, wandb's) are not in it

The configurations:

  baseline       optimizer.step(), nothing else
  control        the same as baseline, on a second model: the measurement's own spread (an A/A test)
  grad           gradwatch, per-layer gradient stats every step; max-abs and weight norms every 10 steps
                 (detail_every's default); no activations, no update ratio
  grad+act/10    ... plus activation statistics every 10 steps
  everything     gradwatch, gradients + activations + update ratio every step (detail every 10)
  guard          gradwatch mode "guard" (stats every step, skip/clip decisions)
  peer-loop      what users write by hand: norm + .item() per parameter, at `grad`'s coverage on the
                 rank's own data (gradient norms and loss every step, max-abs and weight norms every
                 10); no cross-rank statistics
  peer-wandb     wandb.watch(model, log="all", log_freq=1), offline, on rank 0 (gradient and weight
                 histograms); timed against a baseline of its own (its service process works on after
                 its steps and would slow whichever block came next)
  compiled-baseline  torch.compile(DDP(model)) (`--compile-backend`, default inductor), no monitor: the
                 baseline the two below are paired with (their ratio is to it, not to `baseline`)
  compiled       ... with gradwatch attached as `grad` (activations off)
  compiled+act/10  ... with activation statistics every 10 steps, the hooks traced into the graph
                 (DDP only: FSDP2 is compiled per block, which this benchmark does not do)

A regression check against another version of gradwatch (an earlier commit), side by side in one
run: install it apart under another name, then name its configurations (`grad@previous`,
`guard@previous`: `grad` and `guard` run by that version's agent):

    mkdir /tmp/prev && git archive <commit> | tar -x -C /tmp/prev
    .venv/bin/pip install -q --no-deps --target /tmp/prev-site /tmp/prev
    mv /tmp/prev-site/gradwatch /tmp/prev-site/gradwatch_previous   # its imports inside are relative
    .venv/bin/python benchmarks/overhead.py --previous /tmp/prev-site --configs baseline control grad grad@previous ...

Head to head: each gradwatch configuration against the peer at its coverage (`grad` against
`peer-loop`), and against the previous version's (`grad@previous`, `guard@previous`), block by block within the same cycle: the median of (agent's block - peer's block) in
wall ms/step, CPU ms/step and monitor ms/step, with a distribution-free 95% confidence interval for
that median (order statistics of the paired differences). "less" when the interval lies below zero,
"more" when above, "tie" when it holds zero: whether the measurement can tell the two apart.

After the configurations, the price of one collective on this machine: an asynchronous all-reduce of
64 doubles (the size of the agent's packet on these models) overlapped with compute, blocks with and without it in turn
(the cross-rank view the agent pays for and the loop does not have).

Scalar reads (`aten._local_scalar_dense`, i.e. `.item()`: a host-device sync on a GPU) and
collectives (the c10d ops the dispatcher sees; "extra" = beyond the baseline's, i.e. DDP's or FSDP's
own) are counted per step over 20 further, untimed steps (two of them detail steps) under a
dispatch mode. For the compiled configurations the same 22 steps count what Dynamo compiled: graphs,
recompiles and graph breaks (DDP's own forward graph-breaks, agent or not).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

CONFIGS = ("baseline", "control", "grad", "grad+act/10", "everything", "guard", "peer-loop", "peer-wandb",
           "compiled-baseline", "compiled", "compiled+act/10", "grad@previous", "guard@previous")
COMPILED = ("compiled-baseline", "compiled", "compiled+act/10")


def paired_with(config: str) -> str:
    """The baseline a configuration's blocks are paired with: a compiled model's is the compiled model."""
    return "compiled-baseline" if config in COMPILED else "baseline"

# A gradwatch configuration and the peer measured at its coverage, compared block by block; and this
# checkout's agent against the `--previous` one's, configuration for configuration.
HEAD_TO_HEAD = (("grad", "peer-loop"), ("grad", "grad@previous"), ("guard", "guard@previous"))
PREVIOUS = "@previous"  # a configuration run by the agent of `--previous`, imported as `gradwatch_previous`
WORLD = 2  # ranks: --world
TWO_D = ("hsdp", "fsdp2+tp")  # the 2 x 2 mesh layouts


# ---- models -------------------------------------------------------------------------------------

def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


class TinyGPT(nn.Module):
    """6 pre-norm transformer blocks, d=256, 4 heads, causal, sequence 128."""

    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 6, seq: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        block = lambda: nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(x))


def batch(model_name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * dist.get_world_size() + dist.get_rank())
    if model_name == "mlp":
        return torch.randn(64, 512, generator=g), torch.randint(0, 10, (64,), generator=g)
    idx = torch.randint(0, 512, (4, 129), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_fn(model_name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class UserForward(nn.Module):
    """The mlp under a forward of the user's own: Dynamo does not compile torch.nn's own forwards as frames
    of their own (nn.Sequential's, reached from DDP's untraced forward), so torch.compile(DDP(mlp)) would
    run it eagerly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build(model_name: str, wrap: str, compile_backend: Optional[str] = None) -> nn.Module:
    torch.manual_seed(0)
    model = mlp() if model_name == "mlp" else TinyGPT()
    if compile_backend is not None:  # DDP's documented way: compile the wrapped model (graphs split at its buckets)
        assert wrap == "ddp", "compiled configurations run under DDP only"
        model = UserForward(model) if model_name == "mlp" else model
        return torch.compile(nn.parallel.DistributedDataParallel(model), backend=compile_backend)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if wrap == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    elif wrap == "fsdp2+tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if model_name != "mlp":
            raise SystemExit("fsdp2+tp is set up for the mlp only")
        full = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
        plan = {str(i): ColwiseParallel() if k % 2 == 0 else RowwiseParallel() for k, i in enumerate(linears[:-1])}
        parallelize_module(model, full["tp"], plan)
        mesh = full["dp"]
    kwargs = {} if mesh is None else {"mesh": mesh}
    for m in (model if model_name == "mlp" else model.blocks):
        if any(p.requires_grad for p in m.parameters()):
            fully_shard(m, **kwargs)
    return fully_shard(model, **kwargs)


# ---- one configuration --------------------------------------------------------------------------

Sample = tuple[float, float, float, float]  # per step: wall s, CPU s (all ranks), monitor's wall s, monitor's CPU s


class Runner:
    """A model, optimizer and monitor for one configuration; `step()` is one training step."""

    def __init__(self, config: str, model_name: str, wrap: str, tmp: str, compile_backend: str = "inductor") -> None:
        HealthAgent = importlib.import_module("gradwatch_previous.agent" if config.endswith(PREVIOUS) else "gradwatch.agent").HealthAgent
        config = config.removesuffix(PREVIOUS)
        self.config, self.model_name = config, model_name
        self.model = build(model_name, wrap, compile_backend if config in COMPILED else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.agent = None
        self.wandb_run = None
        self.step_no = 0
        # Time in the monitor's own calls between backward() and zero_grad(), the optimizer's step
        # excluded (hooks that run inside forward/backward are not in it): wall and this thread's CPU.
        self.monitor_s = [0.0, 0.0]
        self._optimizer_s = [0.0, 0.0]
        raw_step = self.opt.step

        def timed_step(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return raw_step(*args, **kwargs)
            finally:
                self._optimizer_s[0] += time.perf_counter() - wall
                self._optimizer_s[1] += time.thread_time() - cpu

        self.opt.step = timed_step  # what agent.step calls too
        common = dict(job="bench", metrics_port=None)
        if config in ("grad", "compiled"):
            self.agent = HealthAgent(self.model, self.opt, activation_every=0, update_ratio_every=0, **common)
        elif config in ("grad+act/10", "compiled+act/10"):
            self.agent = HealthAgent(self.model, self.opt, activation_every=10, update_ratio_every=0, **common)
        elif config == "everything":
            self.agent = HealthAgent(self.model, self.opt, activation_every=1, update_ratio_every=1, **common)
        elif config == "guard":
            self.agent = HealthAgent(self.model, self.opt, activation_every=0, update_ratio_every=0, mode="guard", **common)
        elif config == "peer-wandb" and dist.get_rank() == 0:
            import wandb

            self.wandb = wandb
            self.wandb_run = wandb.init(project="gradwatch-bench", mode="offline", dir=tmp)  # its hooks need the global run
            wandb.watch(self.model, log="all", log_freq=1)

    def step(self) -> None:
        x, y = batch(self.model_name, self.step_no)
        loss = loss_fn(self.model_name, self.model(x), y)
        loss.backward()
        wall, cpu = time.perf_counter(), time.thread_time()
        self._optimizer_s = [0.0, 0.0]
        if self.agent is not None:
            self.agent.step(self.opt, loss=loss)
        else:
            if self.config == "peer-loop":
                self.hand_written_monitor(loss)
            self.opt.step()
            if self.wandb_run is not None:
                self.wandb_run.log({"loss": loss.item()})
        self.monitor_s[0] += time.perf_counter() - wall - self._optimizer_s[0]
        self.monitor_s[1] += time.thread_time() - cpu - self._optimizer_s[1]
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1

    def hand_written_monitor(self, loss: torch.Tensor) -> dict:
        """A typical hand-written per-parameter loop, at the coverage of `grad` on this rank's data: gradient L2
        norms and the loss every step, gradient max-abs and weight norms every 10 steps; each value
        read with `.item()` (a sync on a GPU). It has no cross-rank view (the agent's all-reduce)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        record = {"loss": loss.item(), "grad_norm": {n: p.grad.norm().item() for n, p in named}}
        if self.step_no % 10 == 0:
            record["grad_max_abs"] = {n: p.grad.abs().max().item() for n, p in named}
            record["weight_norm"] = {n: p.detach().norm().item() for n, p in named}
        return record

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        if self.wandb_run is not None:
            self.wandb.unwatch(self.model)
            self.wandb_run.finish()


class Count(TorchDispatchMode):
    """Scalar reads (`aten._local_scalar_dense`: `.item()`, a host-device sync on a GPU) and
    collectives (every op in the c10d namespaces: DDP's and FSDP's own, the agent's, and any a
    monitor issues through DTensor), as the dispatcher sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar_reads = 0
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        elif func.namespace in ("c10d", "_c10d_functional"):
            self.collectives += 1
        return func(*args, **(kwargs or {}))


def timed_block(runner: Runner, steps: int) -> Sample:
    """`steps` steps between two barriers: wall seconds per step, CPU seconds per step summed over
    ranks (every thread, the agent's publisher included; waiting not counted, so it is the steadier
    of the two on a shared machine), and the monitor's own wall and CPU seconds per step per rank."""
    dist.barrier()
    runner.monitor_s = [0.0, 0.0]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        runner.step()
    dist.barrier()
    sample = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu, *runner.monitor_s], dtype=torch.float64)
    dist.all_reduce(sample)
    wall_s, cpu_s, monitor_wall_s, monitor_cpu_s = sample.tolist()
    world = dist.get_world_size()
    return wall_s / world / steps, cpu_s / steps, monitor_wall_s / world / steps, monitor_cpu_s / world / steps


def counts(runner: Runner, steps: int = 20) -> tuple[float, float]:
    """Per step, over two detail cycles (20 steps, two of them detail steps, and at least one of the
    agent's combinations of up to 16 steps): scalar reads, collectives."""
    mode = Count()
    with mode:
        for _ in range(steps):
            runner.step()
    return mode.scalar_reads / steps, mode.collectives / steps


def collective_price(blocks: int = 10, reps: int = 20) -> dict:
    """What one asynchronous all-reduce of a packet-sized buffer (64 doubles) adds to a stretch of
    compute that it overlaps (as the agent's overlaps the optimizer's step), on this machine: blocks
    with and without it taken in turn, CPU (this process, every thread) and wall ms per all-reduce.
    The price of the agent's cross-rank view, which the hand-written loop does not have."""
    packet, work_tensor = torch.zeros(64, dtype=torch.float64), torch.randn(512, 512)
    cost = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for _ in range(blocks):
        for with_collective in (False, True):
            dist.barrier()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(reps):
                work = dist.all_reduce(packet, async_op=True) if with_collective else None
                for _ in range(20):  # a few ms of compute
                    work_tensor.mul_(1.0)
                if work is not None:
                    work.wait()
            cost[with_collective][0] += time.process_time() - cpu
            cost[with_collective][1] += time.perf_counter() - wall
    n = blocks * reps
    return dict(cpu_ms=1000 * (cost[True][0] - cost[False][0]) / n, wall_ms=1000 * (cost[True][1] - cost[False][1]) / n)


# ---- driver -------------------------------------------------------------------------------------

def _agreed(fn: Callable, config: str, failed: dict[str, str]):
    """fn() on every rank; if it raised on any, every rank drops the config at the same point
    (a one-sided failure would otherwise leave the ranks in different collectives)."""
    error, result = "", None
    try:
        result = fn()
    except Exception as exc:  # e.g. a peer that does not support FSDP2's DTensors
        error = f"{type(exc).__name__}: {exc}"[:200]
        print(f"rank {dist.get_rank()}: {config} failed: {error}", file=sys.stderr, flush=True)
    flag = torch.tensor([float(bool(error))])
    dist.all_reduce(flag)
    if flag.item():
        failed[config] = error or "failed on another rank"
        return None
    return result


def interleaved(configs: list[str], model_name: str, wrap: str, args: argparse.Namespace, tmp: str,
                failed: dict[str, str]) -> dict[str, list[Sample]]:
    """Every configuration's runner alive at once; blocks of `steps` steps taken in turn, `cycles`
    times per round, in an order rotated each round. Sample i of every configuration comes from the
    same round and cycle, so a ratio of paired samples cancels the machine's drift."""
    samples: dict[str, list[Sample]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        runners: dict[str, Runner] = {}
        torch._dynamo.reset()  # the last round's compiled runners are closed: their cache entries would pile up
        for config in order:
            if config not in failed:
                runner = _agreed(lambda: Runner(config, model_name, wrap, tmp, args.compile_backend), config, failed)
                if runner and _agreed(lambda: [runner.step() for _ in range(args.warmup)], config, failed) is not None:
                    runners[config] = runner
        for _ in range(args.cycles):
            for config in order:
                if config in runners:
                    sample = _agreed(lambda: timed_block(runners[config], args.steps), config, failed)
                    if sample is None:
                        runners.pop(config).close()
                    else:
                        samples[config].append(sample)
        for runner in runners.values():
            runner.close()
    return {c: s for c, s in samples.items() if c not in failed}


def paired(samples: list[Sample], base: list[Sample]) -> dict:
    """Medians of per-block ratios and differences against the baseline's block of the same cycle,
    and of the monitor's own time."""
    ratios = [s[0] / b[0] for s, b in zip(samples, base)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return dict(
        median_step_s=statistics.median(s[0] for s in samples),
        ratio=statistics.median(ratios), ratio_p25=quartiles[0], ratio_p75=quartiles[2],
        added_ms=statistics.median(1000 * (s[0] - b[0]) for s, b in zip(samples, base)),
        cpu_ratio=statistics.median(s[1] / b[1] for s, b in zip(samples, base)),
        monitor_ms=statistics.median(1000 * s[2] for s in samples),
        monitor_cpu_ms=statistics.median(1000 * s[3] for s in samples),
        blocks=len(ratios), samples=samples,
    )


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median and a distribution-free confidence interval for it: the k-th smallest and k-th
    largest values, k the largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. Too few
    values for that confidence (n < 6 at 95%) give the whole range."""
    ordered = sorted(values)
    n, tail, below, k = len(ordered), (1 - confidence) / 2, 0.0, 0
    while k < n and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def head_to_head(agent: list[Sample], peer: list[Sample]) -> dict:
    """Agent's blocks against the peer's blocks of the same cycles: per measure, the median paired
    difference (ms/step; negative: the agent adds less), its 95% interval, and the verdict."""
    out: dict = dict(blocks=min(len(agent), len(peer)))
    for name, index in (("wall_ms", 0), ("cpu_ms", 1), ("monitor_ms", 2)):
        median, low, high = median_ci([1000 * (a[index] - p[index]) for a, p in zip(agent, peer)])
        verdict = "less" if high < 0 else "more" if low > 0 else "tie"
        out[name] = dict(median=median, low=low, high=high, verdict=verdict)
    return out


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.world))
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.previous:
        sys.path.insert(0, args.previous)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tmp = tempfile.mkdtemp(prefix="gradwatch-bench-")
    results: list[dict] = []
    duel: list[dict] = []  # head to head: an agent configuration against the peer at its coverage
    for model_name in args.models:
        for wrap in args.wraps:
            failed: dict[str, str] = {}
            if wrap != "ddp" and "peer-wandb" in args.configs:
                # checked by hand: with wandb.watch on rank 0 the FSDP2 job makes no progress in
                # 150 s (a hang), so it cannot be timed
                failed["peer-wandb"] = "not run: wandb.watch hangs the FSDP2 job"
            if wrap == "fsdp2":
                failed.update({c: "not run: compiled configurations run under DDP only" for c in COMPILED if c in args.configs})
            # wandb's service is a separate process that keeps working after its own steps, so it is
            # timed against a baseline of its own rather than alongside the others.
            main = [c for c in args.configs if c != "peer-wandb"]
            groups = [main] + ([["baseline", "peer-wandb"]] if "peer-wandb" in args.configs and "peer-wandb" not in failed else [])
            measured: dict[str, tuple[list[Sample], list[Sample]]] = {}  # config -> (its samples, its group's baseline)
            for group in groups:
                samples = interleaved(group, model_name, wrap, args, tmp, failed)
                for config in group:
                    if config in samples and paired_with(config) in samples and config not in measured:
                        measured[config] = (samples[config], samples[paired_with(config)])
            for config in args.configs:
                row = dict(model=model_name, wrap=wrap, config=config, paired_with=paired_with(config))
                if config not in measured:
                    row["failed"] = failed.get(config) or failed.get(paired_with(config), "no samples")
                else:
                    torch._dynamo.reset()
                    counters.clear()
                    runner = Runner(config, model_name, wrap, tmp, args.compile_backend)
                    for _ in range(2):
                        runner.step()
                    reads, colls = counts(runner)
                    runner.close()
                    row.update(paired(*measured[config]), scalar_reads_per_step=reads, collectives_per_step=colls)
                    if config in COMPILED:  # over those 22 steps: 2 of them activation-sampled steps
                        row.update(graphs=counters["stats"]["unique_graphs"], recompiles=sum(counters["recompiles"].values()),
                                   graph_breaks=sum(counters["graph_break"].values()))
                results.append(row)
            for agent, peer in HEAD_TO_HEAD:
                if agent in measured and peer in measured and agent in main and peer in main:
                    duel.append(dict(model=model_name, wrap=wrap, agent=agent, peer=peer,
                                     **head_to_head(measured[agent][0], measured[peer][0])))
            rows = {r["config"]: r for r in results[-len(args.configs):]}
            for row in rows.values():
                base = rows[row["paired_with"]]
                if "failed" not in row and "failed" not in base:
                    row["extra_collectives_per_step"] = row["collectives_per_step"] - base["collectives_per_step"]
    price = collective_price()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(results=results, head_to_head=duel, collective=price), f)
    dist.barrier()
    dist.destroy_process_group()


def machine(world: int) -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), threads_per_rank=1, ranks=world, backend="gloo")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=["mlp", "gpt"])
    p.add_argument("--wraps", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2", *TWO_D])
    p.add_argument("--world", type=int, default=WORLD, help="ranks (4 for hsdp and fsdp2+tp)")
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if not c.endswith(PREVIOUS)], choices=CONFIGS)
    p.add_argument("--rounds", type=int, default=3, help="fresh runners, and a rotated order, each round")
    p.add_argument("--cycles", type=int, default=5, help="blocks per configuration per round")
    p.add_argument("--steps", type=int, default=10, help="steps per block (10 = one detail_every cycle)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled configurations")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--previous", metavar="DIR", help="a folder holding another gradwatch as `gradwatch_previous` (see the "
                   "module's docstring): the @previous configurations run its agent, side by side with this one")
    args = p.parse_args(argv)
    if any(c.endswith(PREVIOUS) for c in args.configs) != bool(args.previous):
        p.error("the @previous configurations and --previous go together")
    if any(w in TWO_D for w in args.wraps) and args.world != 4:
        p.error(f"{', '.join(TWO_D)} need --world 4 (a 2 x 2 mesh)")
    if "baseline" not in args.configs:
        args.configs.insert(0, "baseline")
    if any(c in COMPILED for c in args.configs) and "compiled-baseline" not in args.configs:
        args.configs.insert(1, "compiled-baseline")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    started = time.time()
    mp.spawn(worker, args=(port, args, out), nprocs=args.world, join=True)
    measured = json.load(open(out))
    results = measured["results"]
    report = dict(machine=machine(args.world), command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                  compile_backend=args.compile_backend,
                  seconds=round(time.time() - started), results=results, head_to_head=measured["head_to_head"],
                  collective=measured["collective"])
    print(f"{'model':5} {'wrap':8} {'config':17} {'step ms':>8} {'ratio':>6} {'p25-p75':>12} {'+ms/step':>9} "
          f"{'cpu ratio':>9} {'monitor ms':>10} {'.item()/step':>12} {'extra colls/step':>16}")
    for r in results:
        if "failed" in r:
            print(f"{r['model']:5} {r['wrap']:8} {r['config']:17} failed: {r['failed']}")
        else:
            print(f"{r['model']:5} {r['wrap']:8} {r['config']:17} {1000 * r['median_step_s']:8.1f} {r['ratio']:6.3f} "
                  f"{r['ratio_p25']:6.3f}-{r['ratio_p75']:5.3f} {r['added_ms']:9.1f} {r['cpu_ratio']:9.3f} {r['monitor_ms']:10.2f} "
                  f"{r['scalar_reads_per_step']:12.1f} {r.get('extra_collectives_per_step', float('nan')):16.1f}")
    for r in results:
        if "graphs" in r:
            print(f"{r['model']:5} {r['wrap']:8} {r['config']:17} compiled ({args.compile_backend}): {r['graphs']} graph(s), "
                  f"{r['recompiles']} recompiles, {r['graph_breaks']} graph breaks over 22 steps")
    for d in report["head_to_head"]:
        cells = "  ".join(f"{name[:-3]} {d[name]['median']:+.2f} [{d[name]['low']:+.2f}, {d[name]['high']:+.2f}] {d[name]['verdict']}"
                          for name in ("wall_ms", "cpu_ms", "monitor_ms"))
        print(f"{d['model']:5} {d['wrap']:8} {d['agent']} - {d['peer']}, ms/step, median [95% CI] over {d['blocks']} blocks: {cells}")
    price = report["collective"]
    print(f"one async all-reduce of 64 doubles, overlapped with compute: +{price['cpu_ms']:.2f} ms CPU, "
          f"+{price['wall_ms']:.2f} ms wall on rank 0 (the agent makes 1 per combination of steps under DDP; the loop none)")
    print(f"({report['seconds']} s; {report['machine']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
