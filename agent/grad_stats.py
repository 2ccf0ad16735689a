"""Per-layer gradient and weight statistics, computed on the device in a few batched kernels.

`torch._foreach_norm` gives every parameter's L2 and (on a GPU) max-abs norm in one fused launch each; an
`index_add_`/`scatter_reduce_` folds them into layers. Nothing here reads a value back to the host.

What is exact where:
* DDP (and single process): gradients are already averaged and identical on every rank, so the
  per-layer values are final locally and travel as LOCAL packet entries (no collective).
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


class GradStats:
    """Folds parameter-level norms into the layer plan's layers."""

    def __init__(self, plan: LayerPlan, device: torch.device, sharded: bool) -> None:
        self.plan = plan
        self.sharded = sharded
        self.op = Reduce.SUM if sharded else Reduce.LOCAL
        self.max_op = Reduce.MAX if sharded else Reduce.LOCAL
        self._on_cpu = torch.device(device).type == "cpu"
        self._layer_index = torch.tensor(plan.layer_of_param, dtype=torch.long, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)  # stands in for a missing gradient
        self._snapshot: Optional[list[torch.Tensor]] = None
        # _foreach_norm only widens: float64 models need float64 norms.
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in plan.params) else torch.float32

    def _usable(self, tensors: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        # A missing gradient (frozen branch, unused parameter) or an empty FSDP shard counts as zero.
        return [self._zero if t is None or t.numel() == 0 else t for t in tensors]

    def _grads(self) -> list[torch.Tensor]:
        return self._usable([None if p.grad is None else _local(p.grad.detach()) for p in self.plan.params])

    def _weights(self) -> list[torch.Tensor]:
        return self._usable([_local(p.detach()) for p in self.plan.params])

    def _per_layer_sumsq(self, tensors: list[torch.Tensor]) -> torch.Tensor:
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

    def add_gradients(self, packet: Packet) -> torch.Tensor:
        """Returns the local per-layer sums of squares: non-finite exactly where a local gradient
        element is (NaN/inf propagate; a norm that overflows fp32, above ~1.8e19, reads as inf too)."""
        grads = self._grads()
        sumsq = self._per_layer_sumsq(grads)
        packet.put("grad_sumsq", sumsq)
        if "grad_max_abs" in packet:
            packet.put("grad_max_abs", self._per_layer_max_abs(grads))
        return sumsq

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

    def take_snapshot(self) -> None:
        """Copy the local weights so the next measured step can report ||dw||/||w|| (one step of memory)."""
        self._snapshot = [w.clone() for w in self._weights()]

