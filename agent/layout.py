"""Who holds which piece of every parameter, job-wide: the one layer plan every rank reports, and the
rank that measures each piece.

A layer's squared gradient norm is the sum, over the distinct pieces of its full tensors, of each
piece's sum of squares. A piece is held by one rank (an FSDP shard, a tensor-parallel shard, a layer
only one pipeline stage or expert-parallel rank has) or by several identical copies (DDP replicas,
HSDP's replicate dimension, a `Replicate()` placement under tensor parallelism). The agent's one SUM
all-reduce over the world is exact when every distinct piece is counted exactly once:

* mode observe: each piece is measured by one of its holders (balanced by size, the same choice on
  every rank) and the others write zeros, so the norm work is shared out over the copies;
* mode guard: every holder measures its copy, weighed by 1/copies, so a fault in one rank's copy
  (it no longer equals the others) still reaches the reduced value every rank decides from.

Pieces are told apart by DTensor placements, over each tensor's own mesh: a rank's coordinates on the
mesh dimensions that shard the tensor (`Shard`, `_StridedShard`) name its piece; `Replicate()`
dimensions hold copies. A `Partial()` placement holds addends whose norms cannot be summed, and an
unknown placement cannot be counted: both are refused. Plain tensors are full copies (DDP, one
process), except FSDP1's flat parameters, a piece of their own on every rank.

The plan is agreed at construction with two `all_gather_object` calls on the default group: a digest
of the model's structure and the mesh coordinates of every rank, then one parameter list (and list of
modules eligible for activation statistics) per distinct structure (a pipeline stage, an expert-parallel
rank), so the cost grows with the number of distinct structures, not with the world. Every rank takes part in both even when describing its own model
failed, and then every rank raises the same error: one rank cannot leave the others waiting.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .layers import group_layers, trainable


class LayoutError(ValueError):
    """A parallel layout whose statistics gradwatch cannot compute exactly: refused, never estimated."""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as this rank holds it; identical on ranks whose models have the same structure."""

    name: str
    shape: tuple[int, ...]  # the full tensor's
    placements: str  # e.g. "R,S(0)"; "" for a plain tensor
    mesh: int  # index into the rank's distinct meshes, -1 for a plain tensor
    shard_dims: tuple[int, ...]  # mesh dimensions that shard this tensor
    rank_local: bool  # FSDP1: a flat shard, a piece of its own on every rank
    size: int  # elements in one piece (for balancing the work)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def _shard_dims(name: str, placements: Sequence[Any]) -> tuple[int, ...]:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    dims = []
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if isinstance(placement, (Shard, _StridedShard)):
            dims.append(dim)
        elif placement.is_partial():
            raise LayoutError(
                f"parameter {name!r} has a Partial() placement on mesh dimension {dim}: its local values are addends, "
                "and the norm of a sum cannot be summed from the addends' norms. Redistribute it to Shard or Replicate "
                "before training, or leave it out of the agent's model."
            )
        else:
            raise LayoutError(f"parameter {name!r} has a placement gradwatch cannot count: {placement!r}")
    return tuple(dims)


def describe(named: Sequence[tuple[str, torch.Tensor]], rank_local_plain: bool) -> tuple[list[ParamInfo], list[tuple[int, ...]]]:
    """This rank's parameters, and its coordinates on each distinct mesh they use."""
    meshes: list[Any] = []
    coords: list[tuple[int, ...]] = []
    infos = []
    for name, p in named:
        if not _is_dtensor(p):
            infos.append(ParamInfo(name, tuple(p.shape), "", -1, (), rank_local_plain, p.numel()))
            continue
        mesh = p.device_mesh
        index = next((i for i, m in enumerate(meshes) if m == mesh), None)
        if index is None:
            index = len(meshes)
            meshes.append(mesh)
            coords.append(tuple(mesh.get_coordinate()))
        dims = _shard_dims(name, p.placements)
        pieces = math.prod(mesh.size(d) for d in dims)
        infos.append(ParamInfo(name, tuple(p.shape), ",".join(str(pl) for pl in p.placements), index, dims, False,
                               -(-p.numel() // pieces)))
    return infos, coords


def _digest(infos: list[ParamInfo], modules: Sequence[str]) -> str:
    """Of everything but the sizes (uneven shards differ by a row): ranks that share it share the structure."""
    key = [(i.name, i.shape, i.placements, i.mesh, i.shard_dims, i.rank_local) for i in infos] + list(modules)
    return hashlib.sha1(repr(key).encode()).hexdigest()


@dataclass(frozen=True)
class Layout:
    """The job's layer plan and this rank's share of it."""

    layers: tuple[str, ...]  # every layer of the job, in one order on every rank
    layer_of_param: tuple[int, ...]  # per local parameter: its layer
    measured: tuple[int, ...]  # local parameters this rank measures
    weights: Optional[tuple[float, ...]]  # per measured parameter (1/copies in mode guard); None: all 1
    layer_holders: tuple[frozenset[int], ...]  # per layer: the ranks holding any piece of it
    max_by_sum: bool  # each layer is measured whole by one rank: its max-abs survives a SUM (x + 0)
    world_size: int
    modules: tuple[str, ...] = ()  # every module hooked for activations on any rank, in one order everywhere

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def ranks_holding(self, layer: int) -> tuple[int, ...]:
        """The ranks that hold the layer, or () where every rank does (they cannot be told apart)."""
        holders = self.layer_holders[layer]
        return () if len(holders) == self.world_size else tuple(sorted(holders))

    def nonfinite_per_rank(self, layer_nonfinite: Sequence[bool]) -> list[int]:
        """Per rank, the non-finite layers it holds a piece of: a fault every copy shares counts on every
        holder alike, whichever rank measured it (no lone rank stands out)."""
        bad = [layer for layer, is_bad in enumerate(layer_nonfinite) if is_bad]
        return [sum(r in self.layer_holders[layer] for layer in bad) for r in range(self.world_size)]


def _gather(obj: Any, world_size: int) -> list[Any]:
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def decline(exc: BaseException) -> None:
    """Meet the other ranks' `agree` with this rank's failure (its agent could not even be set up),
    so that they raise too instead of waiting for it in a collective: every rank builds, or none."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world_size = dist.get_world_size()
        _gather((None, None, f"rank {dist.get_rank()}: {exc!r}"), world_size)
        _gather(None, world_size)


def agree(model: torch.nn.Module, rank: int, world_size: int, *, rank_local_plain: bool,
          every_copy: bool, depth: Optional[int], max_layers: int,
          modules: Sequence[str] = ()) -> tuple[Layout, list[tuple[str, torch.nn.Parameter]]]:
    """The job-wide layout, and this rank's trainable parameters it indexes. `every_copy`: every holder
    measures its copy (mode guard) rather than one of them. `modules`: this rank's modules eligible for
    activation statistics; the layout's `modules` is their union over the job (pipeline stages differ)."""
    named: list[tuple[str, torch.nn.Parameter]] = []
    try:
        named = trainable(model)
        infos, coords = describe(named, rank_local_plain)
        mine: tuple[Any, ...] = (_digest(infos, modules), coords, None)
    except Exception as exc:  # still meet the other ranks, then everyone raises
        infos, mine = [], (None, None, f"rank {rank}: {exc}")
    gathered = _gather(mine, world_size) if world_size > 1 else [mine]
    failures = [error for _, _, error in gathered if error is not None]
    first = {}
    for r, (digest, _, _) in enumerate(gathered):
        first.setdefault(digest, r)
    structure = (infos, list(modules)) if not failures and first[gathered[rank][0]] == rank else None
    structures = _gather(structure, world_size) if world_size > 1 else [structure]
    if failures:
        raise LayoutError("; ".join(failures))
    by_digest = {digest: structures[r] for digest, r in first.items()}
    layout = plan_layout(rank, [(by_digest[d][0], c) for d, c, _ in gathered],
                         every_copy=every_copy, depth=depth, max_layers=max_layers)
    job_modules = dict.fromkeys(name for d, _, _ in gathered for name in by_digest[d][1])
    return replace(layout, modules=tuple(job_modules)), named


def plan_layout(rank: int, ranks: Sequence[tuple[list[ParamInfo], list[tuple[int, ...]]]],
                *, every_copy: bool, depth: Optional[int], max_layers: int) -> Layout:
    """From every rank's (structure, mesh coordinates), identical on every rank: a pure function, so
    every rank computes the same plan and the same owners."""
    world_size = len(ranks)
    union: list[str] = []
    info_of: dict[str, tuple[int, ParamInfo]] = {}
    for r, (infos, _) in enumerate(ranks):
        for info in infos:
            seen = info_of.get(info.name)
            if seen is None:
                info_of[info.name] = (r, info)
                union.append(info.name)
            elif (seen[1].shape, seen[1].placements, seen[1].shard_dims) != (info.shape, info.placements, info.shard_dims):
                raise LayoutError(
                    f"parameter {info.name!r} is {seen[1].shape} [{seen[1].placements}] on rank {seen[0]} but {info.shape} "
                    f"[{info.placements}] on rank {r}: ranks must name different tensors differently (pipeline stages keep "
                    "the full model's parameter names, as torch.distributed.pipelining does)"
                )
    if not union:
        raise LayoutError("the model has no trainable parameters on any rank (every parameter has requires_grad=False)")
    layers, layer_of_name_list = group_layers(union, depth, max_layers)
    layer_of_name = dict(zip(union, layer_of_name_list))

    holders: dict[tuple, list[int]] = {}  # piece -> the ranks holding a copy of it, ascending
    size_of: dict[tuple, int] = {}
    for r, (infos, coords) in enumerate(ranks):
        for info in infos:
            piece = _piece(info, r, coords)
            holders.setdefault(piece, []).append(r)
            size_of[piece] = info.size

    units: dict[tuple[int, tuple[int, ...]], int] = {}  # (layer, holders) -> elements: measured by one rank
    for piece, who in holders.items():
        unit = (layer_of_name[piece[0]], tuple(who))
        units[unit] = units.get(unit, 0) + size_of[piece]
    load = [0] * world_size
    owner: dict[tuple[int, tuple[int, ...]], int] = {}
    for unit in sorted(units, key=lambda u: (-units[u], u)):
        chosen = min(unit[1], key=lambda r: (load[r], r))
        owner[unit] = chosen
        load[chosen] += units[unit]

    layer_holders: list[set[int]] = [set() for _ in layers]
    layer_owners: list[set[int]] = [set() for _ in layers]
    for (layer, who), chosen in owner.items():
        layer_holders[layer].update(who)
        layer_owners[layer].add(chosen)

    my_infos, my_coords = ranks[rank]
    measured, weights = [], []
    for i, info in enumerate(my_infos):
        piece = _piece(info, rank, my_coords)
        who = tuple(holders[piece])
        if every_copy:
            measured.append(i)
            weights.append(1.0 / len(who))
        elif owner[(layer_of_name[info.name], who)] == rank:
            measured.append(i)
    return Layout(
        layers=tuple(layers),
        layer_of_param=tuple(layer_of_name[i.name] for i in my_infos),
        measured=tuple(measured),
        weights=tuple(weights) if every_copy and any(w != 1.0 for w in weights) else None,
        layer_holders=tuple(frozenset(h) for h in layer_holders),
        max_by_sum=not every_copy and all(len(o) <= 1 for o in layer_owners),
        world_size=world_size,
    )


def _piece(info: ParamInfo, rank: int, coords: list[tuple[int, ...]]) -> tuple:
    """What names this rank's piece of the tensor: equal on exactly the ranks holding identical copies."""
    if info.rank_local:
        return (info.name, ("rank", rank))
    if info.mesh < 0:
        return (info.name, ())
    return (info.name, tuple(coords[info.mesh][d] for d in info.shard_dims))
