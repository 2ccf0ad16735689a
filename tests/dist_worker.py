"""One rank of a multi-process test job, launched by conftest.launch like torchrun would.

usage: dist_worker.py SCENARIO OUT_DIR PARAMS_JSON   (RANK, WORLD_SIZE, MASTER_* in the environment)
Each scenario trains for real with the agent attached and writes OUT_DIR/rank{R}.json.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwatch.agent import HealthAgent
import time

from training_fixtures import dead_and_saturated, mixed_mlp, regression_data, unscaled_regression_model, sigmoid_stack

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def wrap(model: nn.Module, how: str, **ddp_kwargs) -> nn.Module:
    """`mixed_mlp` laid out as users run it: DDP; FSDP2 on the world ("fsdp2") or on a 2-D mesh,
    replicate x shard ("hsdp"); tensor parallel, Linear 3 column-wise and 5 row-wise, on 2 ranks, with
    the world's other dimension holding identical copies ("tp"); and that under FSDP2 ("fsdp2_tp")."""
    if how == "ddp":
        return DDP(model, **ddp_kwargs)
    from torch.distributed.fsdp import fully_shard

    def shard(mesh=None) -> nn.Module:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    if how == "fsdp2":
        return shard()
    from torch.distributed.device_mesh import init_device_mesh

    if how == "hsdp":
        return shard(init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("replicate", "shard")))
    if how in ("tp", "fsdp2_tp"):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (WORLD // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"3": ColwiseParallel(), "5": RowwiseParallel()})
        return shard(mesh["dp"]) if how == "fsdp2_tp" else model
    raise ValueError(how)


def data_part(how: str) -> tuple[int, int]:
    """(which part of the global batch this rank trains on, how many parts): tensor-parallel ranks
    share theirs, and without a data-parallel wrapper ("tp") every rank takes the whole batch."""
    if how == "tp":
        return 0, 1
    if how == "fsdp2_tp":
        return RANK // 2, WORLD // 2
    return RANK, WORLD


def global_batch(step: int, batch: int = 8, features: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(WORLD * batch, features, generator=g), torch.randn(WORLD * batch, 4, generator=g)


def local_slice(t: torch.Tensor, part: tuple[int, int] = (RANK, WORLD)) -> torch.Tensor:
    index, parts = part
    per = t.shape[0] // parts
    return t[index * per : (index + 1) * per]


def layer_norms(model: nn.Module, attr: str) -> list[float]:
    return [float(getattr(p, attr).norm()) if getattr(p, attr) is not None else 0.0 for p in model.parameters()]


def combining(p: dict) -> dict:
    """Agent settings for a scenario: with `combine` = N, combinations of N measured steps after the
    first (which is read at once, before any pace is known); else every step read."""
    if "combine" not in p:
        return dict(combine_seconds=0)
    from gradwatch.agent import schedule

    schedule.MAX_COMBINED = p["combine"]
    return dict(combine_seconds=600)


def published_stats(agent: HealthAgent) -> list:
    """Every step's statistics as this rank publishes them, in order (combined steps arrive together,
    so `last_stats` after a step shows only the newest)."""
    published = []
    publish = agent._publish

    def capture(*args, **kwargs):
        publish(*args, **kwargs)
        published.append(agent.last_stats)

    agent._publish = capture
    return published


# ---- scenarios ---------------------------------------------------------------------------------


def reference(p: dict) -> dict:
    """Agent statistics vs a single-process model trained on the whole global batch."""
    torch.manual_seed(0)
    model = mixed_mlp()
    ref = copy.deepcopy(model)
    accumulate = p.get("accumulate", 1)
    wrapped = wrap(model, p["wrap"])
    part = data_part(p["wrap"])
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    groups_before = len(dist.distributed_c10d._world.pg_map)
    agent = HealthAgent(wrapped, opt, job="ref", metrics_port=None, activation_every=2, update_ratio_every=2,
                        detail_every=p.get("detail_every", 1), mode=p.get("mode", "observe"), **combining(p))
    published = published_stats(agent)
    refs = []
    for step in range(p.get("steps", 4)):
        ref_before = [w.detach().clone() for w in ref.parameters()]
        losses = []
        for micro in range(accumulate):
            x, y = global_batch(step * 10 + micro)
            loss = nn.functional.mse_loss(wrapped(local_slice(x, part)), local_slice(y, part)) / accumulate
            loss.backward()
            losses.append(loss.detach())
            (nn.functional.mse_loss(ref(x), y) / accumulate).backward()
        agent.step(opt, loss=torch.stack(losses).sum())
        ref_grad = layer_norms(ref, "grad")
        ref_max = [float(w.grad.abs().max()) for w in ref.parameters()]
        ref_weight = [float(w.norm()) for w in ref_before]
        ref_opt.step()
        ref_update = [float((w.detach() - b).norm() / b.norm()) if b.norm() > 0 else math.nan for w, b in zip(ref.parameters(), ref_before)]
        opt.zero_grad()
        ref_opt.zero_grad()
        refs.append(dict(ref_grad=ref_grad, ref_global=math.sqrt(sum(g * g for g in ref_grad)), ref_max=ref_max,
                         ref_weight=ref_weight, ref_update=ref_update))
    groups_built = len(dist.distributed_c10d._world.pg_map)
    agent.close()
    groups = [groups_before, groups_built, len(dist.distributed_c10d._world.pg_map)]
    steps = [dict(
        step=st.step,
        agent_grad=st.layer_grad_norm, agent_global=st.grad_norm, agent_max=st.layer_grad_max_abs,
        agent_weight=st.layer_weight_norm, agent_update=st.layer_update_ratio, update_step=st.update_step,
        loss_mean=st.loss_mean, **refs[st.step],
    ) for st in published]
    return dict(steps=steps, layers=list(agent.layers), collectives=agent.counters.collectives, groups=groups,
                syncs=agent.counters.host_syncs, sharding=agent.topology.sharding)


def unscaled_regression(p: dict) -> dict:
    """Unscaled regression target, SGD lr 0.01: diverges to NaN within two epochs."""
    x, y = regression_data()
    model = wrap(unscaled_regression_model(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = HealthAgent(model, opt, job="unscaled-regression", metrics_port=None)
    first_bad_step, step = None, 0
    g = torch.Generator().manual_seed(0)
    for _epoch in range(2):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x) - 32 * WORLD + 1, 32 * WORLD):
            idx = order[start : start + 32 * WORLD]
            xb, yb = local_slice(x[idx]), local_slice(y[idx])
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            # Independent truth, per-parameter (fine in a test): anything non-finite this step? A gradient
            # norm beyond fp32's range counts, as torch's clip_grad_norm_ reports it (its total norm is inf).
            grads = [q.grad for q in model.parameters()]
            bad = (not torch.isfinite(loss).item() or any(not torch.isfinite(g).all() for g in grads)
                   or not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item())
            flag = torch.tensor([float(bad)])
            dist.all_reduce(flag)
            if flag.item() and first_bad_step is None:
                first_bad_step = step
            agent.step(opt, loss=loss)
            opt.zero_grad()
            step += 1
    origin = agent.nan_origin
    agent.close()
    return dict(first_bad_step=first_bad_step, steps=step,
                origin=None if origin is None else dict(step=origin.step, kind=origin.kind, layer=origin.layer, ranks=list(origin.ranks)),
                layers=list(agent.layers))


def nan_inject(p: dict) -> dict:
    """A NaN injected into one rank's activation output at a known module and step."""
    torch.manual_seed(0)
    model = mixed_mlp()
    target = model[p["module"]]
    state = {"step": 0}

    def poison(_m, _i, out):  # registered before the agent's hook, so the agent sees the NaN
        if RANK == p["rank"] and state["step"] == p["step"]:
            return out * float("nan")
        return out

    target.register_forward_hook(poison)
    model = wrap(model, p.get("wrap", "ddp"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job="nan", metrics_port=None, activation_every=p.get("activation_every", 10), **combining(p))
    for step in range(p["step"] + 3):
        state["step"] = step
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
    agent.close()  # reads the steps still pending
    o = agent.nan_origin
    return dict(origin=None if o is None else dict(step=o.step, kind=o.kind, layer=o.layer, ranks=list(o.ranks)))


def acts_fail_then_nan(p: dict) -> dict:
    """Steps combined 4 at a time ({0}, {1, 2}, {3-6}, {7-10}): rank 1's activation hooks fail at step 7
    and a NaN enters rank 0's input at step 8, in the same combination. Publishing step 7 switches
    activations off on every rank before step 8, which still carries a module index, is published."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job="acts-nan", metrics_port=None, activation_every=1, **combining(dict(combine=4)))
    for step in range(11):
        if step == 7 and RANK == 1:
            agent._acts.failed = RuntimeError("injected hook failure")
        x, y = global_batch(step)
        x = local_slice(x)
        if step == 8 and RANK == 0:
            x = x.clone()
            x[0, 0] = float("nan")
        nn.functional.mse_loss(model(x), local_slice(y)).backward()
        agent.step(opt)
        opt.zero_grad()
    agent.close()
    o = agent.nan_origin
    return dict(stats_enabled=agent.failopen.on("stats"), activations_on=agent._acts is not None,
                last_step=agent.last_stats.step, errors=dict(agent.state.errors_total),
                origin=None if o is None else dict(step=o.step, kind=o.kind, layer=o.layer, ranks=list(o.ranks)))


def prometheus(p: dict) -> dict:
    """Rank 0 serves metrics; scrape it over HTTP mid-run."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), p.get("wrap", "ddp"))
    opt = torch.optim.SGD([{"params": list(model.parameters())[:4]}, {"params": list(model.parameters())[4:], "lr": 0.05}], lr=0.01)
    agent = HealthAgent(model, opt, job="prom-test", metrics_port=0, metrics_addr="127.0.0.1", activation_every=2, update_ratio_every=1,
                        heartbeat_s=0.1, **combining(p))
    scrapes = []
    for step in range(6):
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        if step == 4:
            agent.observe_eval(1.5)
        if RANK == 0 and step in (3, 5):
            if step == 5:
                time.sleep(0.5)  # a few heartbeats: every rank's progress after its last step
            scrapes.append(urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode())
    result = dict(scrapes=scrapes, layers=len(agent.layers),
                  activation_modules=0 if agent._acts is None else agent._acts.num_modules,
                  param_groups=len(opt.param_groups), loss_mean=agent.last_stats.loss_mean)
    agent.close()
    return result


def failopen(p: dict) -> dict:
    """Inject a failure on one rank inside the agent; no hang, every rank backs off together."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    agent = HealthAgent(model, opt, job="fail", metrics_port=None, activation_every=1, **combining(p))
    feature = p["feature"]
    for step in range(8):
        if step == 3 and RANK == 1:
            if feature == "stats":
                def boom(_packet):
                    raise RuntimeError("injected gradient-statistics failure")
                agent._grads.add_gradients = boom
            elif feature == "activations":
                agent._acts.failed = RuntimeError("injected hook failure")
        if step == 3 and RANK == 0 and feature == "export":
            def broken_record(_stats):
                raise RuntimeError("injected exporter failure")
            agent.state.record = broken_record
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    result = dict(steps=agent.step_count, stats_enabled=agent.failopen.on("stats"), activations_on=agent._acts is not None,
                  last_step=None if agent.last_stats is None else agent.last_stats.step,
                  errors=dict(agent.state.errors_total),
                  params_identical=all(torch.equal(gathered[0], t) for t in gathered))
    agent.close()
    return result


def frozen_unused(p: dict) -> dict:
    """Frozen parameters and a branch unused this step (grad None): no crash, sane values."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(12, 12)
            self.body = nn.Linear(12, 4)
            self.unused = nn.Linear(12, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.body(torch.relu(self.frozen(x)))

    torch.manual_seed(0)
    model = wrap(Net(), "ddp", find_unused_parameters=True)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    agent = HealthAgent(model, opt, job="frozen", metrics_port=None, **combining(p))
    for step in range(3):
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad(set_to_none=True)
    st = agent.last_stats
    agent.close()
    return dict(layers=list(st.layers), grad=st.layer_grad_norm, nonfinite=st.nonfinite, grad_norm=st.grad_norm)


def replicated_fault(p: dict) -> dict:
    """DDP in mode observe splits the layers across ranks: an inf put into the same gradient on every
    rank (a replicated fault) must read as non-finite on every rank and in every rank's row, whichever
    rank measured that layer."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job="split", metrics_port=None, **combining(p))
    params = list(model.parameters())
    seen = []
    for step, index in enumerate([None, *p["faulty_params"]]):
        x, y = global_batch(step)
        nn.functional.mse_loss(model(local_slice(x)), local_slice(y)).backward()
        saved = [q.detach().clone() for q in params]
        if index is not None:
            params[index].grad.view(-1)[0] = float("inf")
        agent.step(opt)
        opt.zero_grad()
        with torch.no_grad():  # undo the poisoned update, so the next fault is the only one
            for q, kept in zip(params, saved):
                q.copy_(kept)
        st = agent.last_stats
        seen.append(dict(bad_layers=[name for name, bad in zip(st.layers, st.layer_grad_nonfinite) if bad],
                         rows=[r.nonfinite_layers for r in st.ranks], norms=st.layer_grad_norm))
    measured = list(agent.layout.measured)
    agent.close()
    return dict(steps=seen, measured=measured, split=len(measured) < len(params))


def _reference_step(ref: nn.Module, ref_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One step of the single-process model on the whole global batch: the figures the agent must equal."""
    before = [w.detach().clone() for w in ref.parameters()]
    loss = nn.functional.mse_loss(ref(x), y)
    loss.backward()
    grad = layer_norms(ref, "grad")
    out = dict(ref_grad=grad, ref_global=math.sqrt(sum(g * g for g in grad)),
               ref_max=[float(w.grad.abs().max()) for w in ref.parameters()],
               ref_weight=[float(b.norm()) for b in before], ref_loss=float(loss.detach()))
    ref_opt.step()
    ref_opt.zero_grad()
    return out


def _published_steps(published: list, refs: list) -> list:
    return [dict(step=st.step, agent_grad=st.layer_grad_norm, agent_global=st.grad_norm, agent_max=st.layer_grad_max_abs,
                 agent_weight=st.layer_weight_norm, loss_mean=st.loss_mean, **refs[st.step]) for st in published]


def _origin(agent: HealthAgent):
    o = agent.nan_origin
    return None if o is None else dict(step=o.step, kind=o.kind, layer=o.layer, ranks=list(o.ranks))


def pipeline(p: dict) -> dict:
    """Two pipeline stages x two data-parallel copies on 4 ranks, split by hand: ranks 0 and 1 hold modules
    0-3 of `mixed_mlp`, ranks 2 and 3 modules 4-7 (the others Identity, so parameters keep the full model's
    names, as torch.distributed.pipelining's stages do); DDP within each stage; rank r sends its activations
    to rank r + 2 and receives their gradient back. Only the last stage has a loss. At step `nan_step` the
    same gradient of layer 5 turns NaN on both last-stage copies."""
    torch.manual_seed(0)
    full = mixed_mlp()
    ref = copy.deepcopy(full)
    stage, replica, cut = RANK // 2, RANK % 2, 4
    model = nn.Sequential(*[m if (i < cut) == (stage == 0) else nn.Identity() for i, m in enumerate(full)])
    stage_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    wrapped = DDP(model, process_group=stage_groups[stage])
    peer = RANK + 2 if stage == 0 else RANK - 2
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    agent = HealthAgent(wrapped, opt, job="pp", metrics_port=None, detail_every=1, mode=p.get("mode", "observe"),
                        activation_every=p.get("activation_every", 0), **combining(p))
    published = published_stats(agent)
    refs = []
    for step in range(p.get("steps", 4)):
        x, y = global_batch(step)
        x, y = local_slice(x, (replica, 2)), local_slice(y, (replica, 2))
        loss = None
        if stage == 0:
            h = wrapped(x)
            dist.send(h.detach().contiguous(), peer)
            grad = torch.empty_like(h)
            dist.recv(grad, peer)
            h.backward(grad)
        else:
            h = torch.empty(x.shape[0], 32)
            dist.recv(h, peer)
            h.requires_grad_()
            loss = nn.functional.mse_loss(wrapped(h), y)
            loss.backward()
            dist.send(h.grad.contiguous(), peer)
            if step == p.get("nan_step"):
                model[5].weight.grad.view(-1)[0] = float("nan")
        agent.step(opt, loss=loss)
        opt.zero_grad()
        refs.append(_reference_step(ref, ref_opt, *global_batch(step)))
    agent.close()
    return dict(steps=_published_steps(published, refs), layers=list(agent.layers), ref_layers=[n for n, _ in ref.named_parameters()],
                measured=[agent.layout.layers[agent.layout.layer_of_param[i]] for i in agent.layout.measured],
                origin=_origin(agent), collectives=agent.counters.collectives, syncs=agent.counters.host_syncs,
                modules=list(agent._acts.names) if agent._acts is not None else None,
                activations=[dict(step=st.step, **{k: list(v) for k, v in vars(st.activations).items() if isinstance(v, (list, tuple))})
                             for st in published if st.activations is not None])


class _ToExperts(torch.autograd.Function):
    """Into the expert-parallel region: identity forward; backward sums the gradient over the ranks, each
    of which saw only its own experts' share of it (Megatron's copy-to-region)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)
        return g


class _FromExperts(torch.autograd.Function):
    """Out of it: the experts' outputs summed over the ranks forward; backward identity (every rank holds
    the same upstream gradient)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g):
        return g


class MoE(nn.Module):
    """Top-1 mixture of `experts` experts, `local` of them (global indices) held here. `grouped`: one
    (experts, d, d) tensor, the last dimension sharded over an expert-parallel mesh as a DTensor
    (torchtitan's layout); else one module per expert, `experts.<e>`, only the local ones present."""

    def __init__(self, experts: int, local: list[int], grouped: bool, d: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.inp, self.router, self.out = nn.Linear(12, d), nn.Linear(d, experts), nn.Linear(d, 4)
        full = torch.randn(experts, d, d, generator=g) / d ** 0.5
        self.experts_total, self.local, self.grouped = experts, local, grouped
        if grouped:
            self.w = nn.Parameter(full)
        else:
            self.experts = nn.ModuleDict({str(e): nn.Linear(d, d, bias=False) for e in local})
            with torch.no_grad():
                for e in local:
                    self.experts[str(e)].weight.copy_(full[e].T)

    def expert_weights(self) -> dict:
        if self.grouped:
            w = self.w.to_local() if hasattr(self.w, "to_local") else self.w
            return dict(zip(self.local, w))
        return {e: self.experts[str(e)].weight.T for e in self.local}

    def forward(self, x: torch.Tensor, parallel: bool) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        probs = torch.softmax(self.router(h), dim=-1)
        gate, choice = probs.max(dim=-1)
        if parallel:
            h, gate = _ToExperts.apply(h), _ToExperts.apply(gate)
        mixed = torch.zeros_like(h)
        for e, w in self.expert_weights().items():
            mask = (choice == e).unsqueeze(-1)
            mixed = mixed + torch.where(mask, (h @ w) * gate.unsqueeze(-1), 0.0)
        if parallel:
            mixed = _FromExperts.apply(mixed)
        return self.out(mixed)


def experts(p: dict) -> dict:
    """Expert parallel on 4 ranks: 8 experts, 2 per rank, every rank routing the whole batch (the dense layers
    are identical copies). `grouped`: one expert tensor, a DTensor sharded over the world's mesh; else each
    expert its own module, named by its global index, present on its rank only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    n, grouped = 2 * WORLD, p["grouped"]
    local = [RANK * 2, RANK * 2 + 1]
    model = MoE(n, local, grouped)
    ref = MoE(n, list(range(n)), grouped=False)
    # the same experts (MoE seeds them itself), and the same dense layers
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("inp", "router", "out")}, strict=False)
    if grouped:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        model.w = nn.Parameter(distribute_tensor(model.w.detach(), mesh, [Shard(0)]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    agent = HealthAgent(model, opt, job="ep", metrics_port=None, detail_every=1, mode=p.get("mode", "observe"), activation_every=0)
    published = published_stats(agent)
    grads = []
    for step in range(3):
        x, y = global_batch(step)
        nn.functional.mse_loss(model(x, parallel=True), y).backward()
        agent.step(opt)
        opt.zero_grad()
        ref_loss = nn.functional.mse_loss(ref(x, parallel=False), y)
        ref_loss.backward()
        by_name = {n_: float(q.grad.norm()) for n_, q in ref.named_parameters()}
        grads.append(dict(ref_by_name=by_name, ref_global=math.sqrt(sum(g * g for g in by_name.values()))))
        ref_opt.step()
        ref_opt.zero_grad()
    agent.close()
    return dict(layers=list(agent.layers), steps=[dict(step=st.step, agent=dict(zip(st.layers, st.layer_grad_norm)),
                                                       agent_global=st.grad_norm, **grads[st.step]) for st in published])


def lone_close(p: dict) -> dict:
    """Mode observe, combinations {0}, {1, 2}, then step 3 pending. Rank 1 closes at once, as on an exception;
    rank 0 goes on with a collective of its own on the training group, then closes only after rank 1
    gave up. Rank 1's close-time read must not pair with rank 0's collective, and neither close may
    hang: both drop the pending steps after the timeout."""
    from gradwatch.agent import closing

    closing.TIMEOUT_S = p["timeout_s"]
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job="lone", metrics_port=None, **combining(dict(combine=10)))
    published = published_stats(agent)
    for step in range(4):
        x, y = global_batch(step)
        nn.functional.mse_loss(model(local_slice(x)), local_slice(y)).backward()
        agent.step(opt)
        opt.zero_grad()
    started = time.monotonic()
    if RANK == 1:
        agent.close()
    closed_s = time.monotonic() - started
    mine = torch.tensor([float(RANK + 1)])
    dist.all_reduce(mine)  # the user's own collective, on the training group
    if RANK == 0:
        time.sleep(p["timeout_s"] + 1)
        started = time.monotonic()
        agent.close()
        closed_s = time.monotonic() - started
    return dict(published=len(published), closed_s=closed_s, user_sum=float(mine))


def activations(p: dict) -> dict:
    """Dead units and saturation are judged over the *global* batch (reduced across ranks)."""
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(8))
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(8) * 30.0)  # tanh inputs = 30 * relu(x): saturated where x > 9.4999/30
        model[2].bias.zero_()
    model = wrap(model, "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = HealthAgent(model, opt, job="acts", metrics_port=None, activation_every=1, **combining(p))
    # rank 0: units 0-3 negative (zero after ReLU), 4-7 positive; rank 1: unit 0 positive, others negative.
    sign = torch.tensor([-1.0] * 4 + [1.0] * 4) if RANK == 0 else torch.tensor([1.0] + [-1.0] * 7)
    for step in range(3):
        x = sign * (torch.rand(6, 8) + 0.5)
        loss = model(x).sum()
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
    acts = agent.last_stats.activations
    agent.close()
    return dict(modules=list(acts.modules), dead=acts.dead_ratio, saturated=acts.saturated_ratio, mean=acts.mean)


_ACTIVATION_FIELDS = ("mean", "std", "max_abs", "nonfinite", "saturated_ratio", "dead_ratio")


def activation_reference(model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """Every hooked module's activation statistics over the whole batch `x`, computed directly."""
    from gradwatch.agent.activations import eligible

    found: dict[str, dict] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            y, z = out.detach().double(), inputs[0].detach()
            unit_dim = 1 if y.ndim >= 4 else y.ndim - 1
            alive = y.movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim]).ne(0).any(0)
            saturated = ((z.abs() > 9.4999) if isinstance(module, nn.Tanh) else
                         ((z < -23.0) | (z > 16.99999)) if isinstance(module, nn.Sigmoid) else torch.zeros_like(z, dtype=torch.bool))
            found[name] = dict(mean=float(y.mean()), std=float(y.std(unbiased=False)), max_abs=float(y.abs().max()),
                               saturated_ratio=float(saturated.double().mean()), dead_ratio=float((~alive).double().mean()))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in eligible(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


class _UserNet(nn.Module):
    """A forward of the user's own: Dynamo compiles it as a frame (torch.nn's own frames, reached from DDP's
    forward, which Dynamo does not trace, it skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = dead_and_saturated()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def compiled(p: dict) -> dict:
    """A compiled DDP model, `torch.compile(DDP(model))` ("compile_ddp") or `DDP(torch.compile(model))`
    ("ddp_compiled"), with activation statistics every 10 steps: the frames and graphs Dynamo compiled
    (`error_on_recompile` makes a recompile raise), and each sampled step's statistics with those of a
    single-process model on the whole global batch (trained alongside)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.config.error_on_recompile = True
    torch.manual_seed(0)
    model = _UserNet()
    ref = copy.deepcopy(model)
    backend = p.get("backend", "aot_eager")
    net = torch.compile(DDP(model), backend=backend) if p["order"] == "compile_ddp" else DDP(torch.compile(model, backend=backend))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    agent = HealthAgent(net, opt, job="compiled", metrics_port=None, activation_every=10, **combining(p))
    published = published_stats(agent)
    refs = {}
    for step in range(p.get("steps", 21)):
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(net(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        if step % 10 == 0:
            refs[step] = activation_reference(ref, x)
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    agent.close()
    sampled = [st for st in published if st.activations is not None]
    return dict(frames=dict(counters["frames"]), graphs=counters["stats"]["unique_graphs"],
                recompiles=sum(counters["recompiles"].values()), errors=dict(agent.state.errors_total),
                traced=agent._acts is not None and agent._acts.traced, modules=list(sampled[0].activations.modules) if sampled else [],
                steps=[dict(step=st.step, ref=refs[st.step], **{k: getattr(st.activations, k) for k in _ACTIVATION_FIELDS})
                       for st in sampled])


def alerting(p: dict) -> dict:
    """A paced training job for the end-to-end alerting test: rank 0 serves metrics on a fixed port
    for a real Prometheus. kind: healthy | nan | exploding | vanishing. Returns when the fault began."""
    kind, pace = p["kind"], p["seconds_per_step"]
    torch.manual_seed(0)
    if kind == "exploding":  # unscaled regression target, SGD lr 0.01
        model, (x_all, y_all), lr = unscaled_regression_model(), regression_data(), 0.01
    elif kind == "vanishing":  # the sigmoid stack, N(0,1) init, deep enough to vanish 100x
        model, lr = sigmoid_stack(depth=30), 1e-3
        g = torch.Generator().manual_seed(0)
        x_all, y_all = torch.randn(256, 50, generator=g), torch.rand(256, 50, generator=g)
    else:
        model, lr = mixed_mlp(), 1e-3
        g = torch.Generator().manual_seed(0)
        x_all = torch.randn(512, 12, generator=g)
        y_all = torch.tanh(x_all[:, :4]) + 0.05 * torch.randn(512, 4, generator=g)
    state = {"poison": False}
    if kind == "nan":
        def poison(_m, _i, out):
            return out * float("nan") if (state["poison"] and RANK == 1) else out
        model[3].register_forward_hook(poison)
    model = wrap(model, "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=lr) if kind in ("exploding", "vanishing") else torch.optim.Adam(model.parameters(), lr=lr)
    agent = HealthAgent(model, opt, job=p["job"], metrics_port=p["port"] if RANK == 0 else None,
                        metrics_addr="127.0.0.1", activation_every=5, update_ratio_every=5,
                        aggregator_url=p.get("url"), aggregator_token=p.get("token"), command_poll_s=0.2)
    losses, lrs = [], []
    fault_time = time.time() if kind in ("exploding", "vanishing") else None
    batch = 32
    for step in range(p["steps"]):
        started = time.time()
        if kind == "nan" and step == p["fault_step"]:
            state["poison"], fault_time = True, time.time()
        idx = torch.arange(step * batch * WORLD, (step + 1) * batch * WORLD) % len(x_all)
        xb, yb = local_slice(x_all[idx]), local_slice(y_all[idx])
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        losses.append(float(loss.detach()))
        lrs.append(opt.param_groups[0]["lr"])
        step_pace = pace if step < p.get("slow_steps", p["steps"]) else p.get("fast_pace", pace)
        time.sleep(max(0.0, step_pace - (time.time() - started)))
    time.sleep(p.get("linger", 0))  # keep serving the last values for a few scrapes
    agent.close()
    return dict(fault_time=fault_time, origin=None if agent.nan_origin is None else agent.nan_origin.layer,
                losses=losses, lrs=lrs)


def stall(p: dict) -> dict:
    """A paced DDP job whose rank `stall_rank` stops for good before the forward of `stall_step`
    (a dead data loader, a hung GPU): the other rank then waits in the gradient all-reduce. It writes
    stall_time first. Without stall_step: a healthy run of `steps` steps."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job=p["job"], metrics_port=p["port"] if RANK == 0 else None, metrics_addr="127.0.0.1",
                        heartbeat_s=p.get("heartbeat_s", 0.5), aggregator_url=p.get("url"), aggregator_token=p.get("token"),
                        command_poll_s=0.5)
    for step in range(p["steps"]):
        started = time.time()
        if step == p.get("stall_step") and RANK == p["stall_rank"]:
            Path(p["out"], "stall_time").write_text(repr(time.time()))
            stuck_before_the_forward()
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        time.sleep(max(0.0, p["seconds_per_step"] - (time.time() - started)))
    time.sleep(p.get("linger", 0))
    agent.close()
    return dict(steps=p["steps"])


def stuck_before_the_forward() -> None:
    time.sleep(3600)  # the stack dump must name this function


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:  # repr of each float64 is exact (round-trips); no numpy in the test venv
        h.update(repr(_full(t.detach()).double().flatten().tolist()).encode())
    return h.hexdigest()


def guard(p: dict) -> dict:
    """Mode guard under DDP/FSDP2 with Adam: a NaN in one rank's loss at `nan_step` must be skipped
    on every rank with parameters and optimizer state untouched; a spike at `spike_step` clipped; an
    inf put into one rank's gradient after backward (`grad_fault_step`) skipped on every rank too."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), p["wrap"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    agent = HealthAgent(model, opt, job="guard", metrics_port=None, mode="guard", guard_warmup_steps=5)
    skipped, clipped, around_nan = [], [], {}
    for step in range(p["steps"]):
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        if step == p["spike_step"] and RANK == 0:
            loss = loss * 1000.0
        if step == p["nan_step"] and RANK == 1:
            loss = loss * float("nan")
        loss.backward()
        if step == p.get("grad_fault_step") and RANK == 1:  # a fault on one rank after the gradient all-reduce
            grad = next(q for q in model.parameters() if q.grad is not None).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")  # FSDP2: this rank's shard
        if step == p["nan_step"]:
            around_nan["params"] = _digest(model.parameters())
            around_nan["opt"] = _digest(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        before = (agent.state.skipped_steps_total["nonfinite"], agent.state.clipped_steps_total)
        agent.step(opt, loss=loss)
        if agent.state.skipped_steps_total["nonfinite"] > before[0]:
            skipped.append(step)
        if agent.state.clipped_steps_total > before[1]:
            clipped.append(step)
        if step == p["nan_step"]:
            around_nan["params_after"] = _digest(model.parameters())
            around_nan["opt_after"] = _digest(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        opt.zero_grad()
    final = _digest(model.parameters())
    finite = all(torch.isfinite(_full(q.detach())).all() for q in model.parameters())
    bound = agent.guard.bound
    agent.close()
    return dict(skipped=skipped, clipped=clipped, final=final, finite=bool(finite), bound=bound, **around_nan)


def commands(p: dict) -> dict:
    """Paced training that takes remediation commands from a real aggregator; records, per step,
    what every rank has in force, so the test can check they changed at the same step."""
    torch.manual_seed(0)
    model = wrap(mixed_mlp(), p["wrap"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    halted = Path(p["out"]) / f"halted-rank{RANK}"

    def on_halt(step: int) -> None:  # the user's checkpoint
        halted.write_text(str(step))

    agent = HealthAgent(model, opt, job=p["job"], metrics_port=None, aggregator_url=p["url"], aggregator_token=p["token"],
                        command_poll_s=0.2, on_halt=on_halt)
    history, step_seconds = [], []
    for step in range(p["steps"]):
        started = time.time()
        x, y = global_batch(step)
        loss = nn.functional.mse_loss(model(local_slice(x)), local_slice(y))
        loss.backward()
        t0 = time.perf_counter()
        agent.step(opt, loss=loss)
        step_seconds.append(time.perf_counter() - t0)
        opt.zero_grad()
        history.append(dict(step=step, lr=opt.param_groups[0]["lr"], clip=agent.remediation.clip_norm,
                            skipped=agent.state.skipped_steps_total["command"], clipped=agent.state.clipped_steps_total))
        if step == 3:  # tells the test training is under way (start-up time varies with load)
            (Path(p["out"]) / f"training-rank{RANK}").write_text("")
        time.sleep(max(0.0, p["seconds_per_step"] - (time.time() - started)))
    agent.close()
    return dict(history=history, final=_digest(model.parameters()), step_seconds=step_seconds)


SCENARIOS = {f.__name__: f for f in (reference, unscaled_regression, nan_inject, acts_fail_then_nan, prometheus, failopen, frozen_unused, replicated_fault, lone_close, activations, compiled, alerting, guard, commands, pipeline, experts, stall)}


def main() -> None:
    scenario, out_dir, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    try:
        result = SCENARIOS[scenario](params)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    (out_dir / f"rank{RANK}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
