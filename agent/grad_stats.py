"""Per-layer gradient and weight statistics, computed on the device in a few batched kernels.

`torch._foreach_norm` gives every parameter's L2 and (on a GPU) max-abs norm in one fused launch each; an
`index_add_`/`scatter_reduce_` folds them into layers. Nothing here reads a value back to the host.

What is exact where:
* Single process, and DDP in mode guard: the gradients are final locally and travel as LOCAL
  packet entries (no collective). The guard reads every layer on every rank, so a fault on one rank
  after DDP's all-reduce (its copy no longer equals the others') is still seen and skipped everywhere.
* DDP otherwise: gradients and weights are identical on every rank, so each rank measures only the
  layers it owns (`split_layers`: whole layers, balanced by size, the same split on every rank) and
  writes zeros elsewhere; the SUM all-reduce the step makes anyway assembles them (x + 0 is exact,
  for max-abs too). The norm work per rank falls by the world size, and no collective is added.
* FSDP2 / FSDP1: each rank holds a shard, so each rank contributes its shard's sum of squares
  (SUM across ranks gives the full tensor's squared norm) and its shard's max-abs (MAX across).
  Gradient norms are fp32 like `clip_grad_norm_`: a norm above ~1.8e19 reads as +inf and counts as
  non-finite (an update that large is garbage either way).

Only the gradient L2 pass runs every measured step; max-abs and weight norms run every
`detail_every` steps (each is one more pass over every parameter).
"""

from __future__ import annotations

from typing import Optional

import torch

from .layers import LayerPlan
from .packet import Entry, Packet, Reduce

_INF = float("inf")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def split_layers(sizes: list[int], world_size: int) -> list[int]:
    """The rank that measures each layer: largest first onto the least-loaded rank. A function of the
    layer sizes alone, so every rank computes the same split."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for layer in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[layer] = rank
        load[rank] += sizes[layer]
    return owner


class GradStats:
    """Folds parameter-level norms into the layer plan's layers.

    `split`: gradients are replicated across `world_size` ranks and this rank measures only its share
    of the layers (the packet's SUM puts the shares together)."""

    def __init__(self, plan: LayerPlan, device: torch.device, sharded: bool,
                 rank: int = 0, world_size: int = 1, split: bool = False) -> None:
        self.plan = plan
        self.sharded = sharded
        self.split = split and world_size > 1 and not sharded
        self.op = Reduce.SUM if sharded or self.split else Reduce.LOCAL
        self.max_op = Reduce.MAX if sharded else self.op
        self._on_cpu = torch.device(device).type == "cpu"
        mine = range(len(plan.params))
        if self.split:
            sizes = [0] * plan.num_layers
            for p, layer in zip(plan.params, plan.layer_of_param):
                sizes[layer] += p.numel()
            owner = split_layers(sizes, world_size)
            mine = [i for i, layer in enumerate(plan.layer_of_param) if owner[layer] == rank]
        self._params = [plan.params[i] for i in mine]  # what this rank measures
        self._layer_index = torch.tensor([plan.layer_of_param[i] for i in mine], dtype=torch.long, device=device)
        self._local = _local if sharded else _itself
        self._zero = torch.zeros((), dtype=torch.float32, device=device)  # stands in for a missing gradient
        self._snapshot: Optional[list[torch.Tensor]] = None
        # _foreach_norm only widens: float64 models need float64 norms.
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in plan.params) else torch.float32
        self._empty = torch.zeros(plan.num_layers, dtype=torch.float64, device=device)

    def _usable(self, tensors: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        # A missing gradient (frozen branch, unused parameter) or an empty FSDP shard counts as zero.
        return [self._zero if t is None or t.numel() == 0 else t for t in tensors]

    def _grads(self) -> list[torch.Tensor]:
        local = self._local
        return self._usable([None if p.grad is None else local(p.grad) for p in self._params])

    def _weights(self) -> list[torch.Tensor]:
        local = self._local
        return self._usable([local(p) for p in self._params])

    def _per_layer_sumsq(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:  # more ranks than layers: this one measures none
            return self._empty
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=self._norm_dtype)).double()
        out = torch.zeros(self.plan.num_layers, dtype=torch.float64, device=norms.device)
        return out.index_add_(0, self._layer_index, norms * norms)

    def _max_abs(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._on_cpu:
            # On CPU the inf-norm has no vectorized kernel: one aminmax per tensor (NaN propagates)
            # measured 8-9x faster on the benchmark transformer (BENCHMARKS.md). On a GPU the fused
            # foreach launch is one kernel instead of one per tensor.
            return [torch.maximum(-low, high) for low, high in map(torch.aminmax, tensors)]
        return list(torch._foreach_norm(tensors, _INF, dtype=self._norm_dtype))

    def _per_layer_max_abs(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return self._empty
        maxes = torch.stack(self._max_abs(tensors)).double()
        out = torch.zeros(self.plan.num_layers, dtype=torch.float64, device=maxes.device)
        return out.scatter_reduce_(0, self._layer_index, maxes, "amax")

    def spec(self, with_detail: bool, with_update: bool) -> list[Entry]:
        """Gradient sums of squares always; max-abs and weight norms on detail steps (each costs a
        full pass over the parameters, and weights change slowly); the update on update steps."""
        n = self.plan.num_layers
        entries = [Entry("grad_sumsq", self.op, n)]
        if with_detail:
            entries += [Entry("grad_max_abs", self.max_op, n), Entry("weight_sumsq", self.op, n)]
        if with_update:
            entries += [Entry("update_sumsq", self.op, n), Entry("update_base_sumsq", self.op, n)]
        return entries

    @torch.no_grad()  # no graph, and DTensor.to_local's plain path (no autograd function, no DTensor detach)
    def add_gradients(self, packet: Packet) -> torch.Tensor:
        """Returns the local per-layer sums of squares (zero for layers another rank measures):
        non-finite exactly where a local gradient element is (NaN/inf propagate; a norm that overflows fp32, above ~1.8e19, reads as inf too)."""
        grads = self._grads()
        sumsq = self._per_layer_sumsq(grads)
        packet.put("grad_sumsq", sumsq)
        if "grad_max_abs" in packet:
            packet.put("grad_max_abs", self._per_layer_max_abs(grads))
        return sumsq

    @torch.no_grad()
    def add_weights(self, packet: Packet) -> None:
        """Weight norms on detail steps and, if a snapshot is pending, the update of the step it was taken before."""
        if "weight_sumsq" not in packet and "update_sumsq" not in packet:
            return
        weights = self._weights()
        if "weight_sumsq" in packet:
            packet.put("weight_sumsq", self._per_layer_sumsq(weights))
        if "update_sumsq" in packet:
            snapshot, self._snapshot = self._snapshot, None
            if snapshot is None:
                raise RuntimeError("update ratio due but no weight snapshot was taken")
            packet.put("update_sumsq", self._per_layer_sumsq(torch._foreach_sub(weights, snapshot)))
            packet.put("update_base_sumsq", self._per_layer_sumsq(snapshot))

    @torch.no_grad()
    def take_snapshot(self) -> None:
        """Copy the weights this rank measures so the next measured step can report ||dw||/||w|| (one
        step of memory: under DDP's split, 1/world_size of the model per rank)."""
        self._snapshot = [w.clone() for w in self._weights()]

