"""Per-layer gradient and weight statistics, computed on the device in a few batched kernels.

`torch._foreach_norm` gives every parameter's L2 and (on a GPU) max-abs norm in one fused launch each; an
`index_add_`/`scatter_reduce_` folds them into layers. Nothing here reads a value back to the host.

Which parameters a rank measures, and with what weight, comes from the job's layout (layout.py): every
distinct piece of every tensor (a shard, or one of a set of identical copies) is counted once in the
SUM all-reduce the step makes anyway, so per-layer and global norms are exact on every layout it
accepts (one process, DDP, FSDP2, HSDP, tensor parallel, FSDP2 + TP, pipeline stages, expert
parallel). Layers a rank does not hold, or whose pieces another rank measures, read zero there.
Max-abs is reduced by MAX, except where each layer is measured whole by one rank (DDP in mode
observe): there the SUM keeps it exact (x + 0 = x) and no MAX collective is needed for it.
Gradient norms are fp32 like `clip_grad_norm_`: a norm above ~1.8e19 reads as +inf and counts as
non-finite (an update that large is garbage either way).

Only the gradient L2 pass runs every measured step; max-abs and weight norms run every
`detail_every` steps (each is one more pass over every parameter).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import Layout
from .packet import Entry, Packet, Reduce

_INF = float("inf")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class GradStats:
    """Folds the norms of the parameters this rank measures into the job's layers."""

    def __init__(self, params: Sequence[torch.nn.Parameter], layout: Layout, device: torch.device) -> None:
        self.layout = layout
        shared = layout.world_size > 1
        self.op = Reduce.SUM if shared else Reduce.LOCAL
        self.max_op = Reduce.MAX if shared and not layout.max_by_sum else self.op
        self._on_cpu = torch.device(device).type == "cpu"
        self._params = [params[i] for i in layout.measured]  # what this rank measures
        self._layer_index = torch.tensor([layout.layer_of_param[i] for i in layout.measured], dtype=torch.long, device=device)
        self._weights = None if layout.weights is None else torch.tensor(layout.weights, dtype=torch.float64, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)  # stands in for a missing gradient
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._checked = False
        # _foreach_norm only widens: float64 models need float64 norms.
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self._empty = torch.zeros(layout.num_layers, dtype=torch.float64, device=device)

    def _usable(self, tensors: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        # A missing gradient (frozen branch, unused parameter) or an empty FSDP shard counts as zero.
        return [self._zero if t is None or t.numel() == 0 else t for t in tensors]

    def _grads(self) -> list[torch.Tensor]:
        if not self._checked:
            self._check_grad_placements()
        return self._usable([None if p.grad is None else _local(p.grad) for p in self._params])

    def _check_grad_placements(self) -> None:
        """A gradient placed unlike its parameter (a Partial() gradient left unreduced) would be
        summed as if it were the parameter's piece: refused, once, on the first measured step."""
        for p in self._params:
            grad_placements = getattr(p.grad, "placements", None)
            if grad_placements is not None and tuple(grad_placements) != tuple(p.placements):
                raise ValueError(f"a gradient is placed {tuple(grad_placements)} but its parameter {tuple(p.placements)}: "
                                 "its norm cannot be summed from the ranks' pieces")
        self._checked = True

    def _local_weights(self) -> list[torch.Tensor]:
        return self._usable([_local(p) for p in self._params])

    def _per_layer_sumsq(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:  # more ranks than layers: this one measures none
            return self._empty
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=self._norm_dtype)).double()
        sumsq = norms * norms if self._weights is None else norms * norms * self._weights
        out = torch.zeros(self.layout.num_layers, dtype=torch.float64, device=norms.device)
        return out.index_add_(0, self._layer_index, sumsq)

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
        out = torch.zeros(self.layout.num_layers, dtype=torch.float64, device=maxes.device)
        return out.scatter_reduce_(0, self._layer_index, maxes, "amax")

    def spec(self, with_detail: bool, with_update: bool) -> list[Entry]:
        """Gradient sums of squares always; max-abs and weight norms on detail steps (each costs a
        full pass over the parameters, and weights change slowly); the update on update steps."""
        n = self.layout.num_layers
        entries = [Entry("grad_sumsq", self.op, n)]
        if with_detail:
            entries += [Entry("grad_max_abs", self.max_op, n), Entry("weight_sumsq", self.op, n)]
        if with_update:
            entries += [Entry("update_sumsq", self.op, n), Entry("update_base_sumsq", self.op, n)]
        return entries

    @torch.no_grad()  # no graph, and DTensor.to_local's plain path (no autograd function, no DTensor detach)
    def add_gradients(self, packet: Packet) -> None:
        """Per-layer sums of squares of what this rank measures (zero elsewhere): non-finite exactly
        where a measured gradient element is (NaN/inf propagate; a norm that overflows fp32, above
        ~1.8e19, reads as inf too)."""
        grads = self._grads()
        packet.put("grad_sumsq", self._per_layer_sumsq(grads))
        if "grad_max_abs" in packet:
            packet.put("grad_max_abs", self._per_layer_max_abs(grads))

    @torch.no_grad()
    def add_weights(self, packet: Packet) -> None:
        """Weight norms on detail steps and, if a snapshot is pending, the update of the step it was taken before."""
        if "weight_sumsq" not in packet and "update_sumsq" not in packet:
            return
        weights = self._local_weights()
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
        step of memory: in mode observe, this rank's share of the pieces, 1/world_size of a DDP model)."""
        self._snapshot = [w.clone() for w in self._local_weights()]

