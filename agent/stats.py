"""What one measured step looked like, on the host: the record every sink (Prometheus, JSON lines,
in-process rules) reads. Built on every rank from identical reduced values, so every rank could take
the same decision from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

# Per-rank slab: each rank writes its own row of a world_size x RANK_FIELDS block of the SUM
# buffer; summing gives every rank every row (an all-gather folded into the all-reduce).
RANK_FIELDS = (
    "has_loss",            # 1 if a loss was passed to step()
    "loss",                # this rank's local loss (mean of the tensor passed)
    "nonfinite_modules",   # hooked modules whose output was non-finite this step
    "first_bad_module",    # 1 + index of the module that went non-finite first (0 = none)
    "step_seconds",        # this rank's wall time per step since its previous measured step
    "error",               # 1 if the agent failed on this rank this step (all ranks then back off)
)
RANK_INDEX = {name: i for i, name in enumerate(RANK_FIELDS)}


def early_late_ratio(layer_norms: list[float]) -> Optional[float]:
    """L2 norm of the first quarter of layers over the last quarter's (registration order, which
    follows depth in most models). Layers with no gradient (norm 0: unused) are left out; None with
    fewer than two such layers or a zero/non-finite denominator."""
    norms = [n for n in layer_norms if n != 0]
    if len(norms) < 2:
        return None
    k = max(1, len(norms) // 4)
    early = math.sqrt(sum(n * n for n in norms[:k]))
    late = math.sqrt(sum(n * n for n in norms[-k:]))
    if late == 0 or not math.isfinite(late) or not math.isfinite(early):
        return None
    return early / late


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass
class RankStats:
    rank: int
    loss: Optional[float]
    loss_nonfinite: bool
    nonfinite_modules: int
    nonfinite_layers: int  # non-finite layers this rank holds a piece of
    step_seconds: float


@dataclass
class ActivationStats:
    modules: tuple[str, ...]
    mean: list[float]
    std: list[float]
    max_abs: list[float]
    nonfinite: list[int]
    saturated_ratio: list[float]
    dead_ratio: Optional[list[float]]  # None until the unit layout is agreed (first sampled step)


@dataclass
class NanOrigin:
    """Where a non-finite value first appeared. `ranks` is empty when it cannot be told apart
    (replicated gradients are the same on every rank)."""

    step: int
    kind: str  # "activation" | "loss" | "gradient"
    layer: str
    ranks: tuple[int, ...]


@dataclass
class StepStats:
    step: int
    time: float
    world_size: int
    layers: tuple[str, ...]
    grad_norm: float  # global L2 norm of all gradients, before any clipping
    layer_grad_norm: list[float]
    layer_grad_nonfinite: list[bool]
    learning_rates: list[float]
    ranks: list[RankStats]
    layer_grad_max_abs: Optional[list[float]] = None  # detail steps only (every `detail_every`)
    layer_weight_norm: Optional[list[float]] = None  # detail steps only
    loss_mean: Optional[float] = None  # across ranks that passed a loss
    loss_max: Optional[float] = None
    update_step: Optional[int] = None  # the step whose update `layer_update_ratio` measures
    layer_update_ratio: Optional[list[float]] = None
    activations: Optional[ActivationStats] = None
    nan_origin: Optional[NanOrigin] = None  # set on the step a non-finite value is first seen
    extra: dict = field(default_factory=dict)

    @property
    def nonfinite(self) -> bool:
        """True if anything this step was NaN/inf on any rank: a gradient, a loss, or an activation.
        The per-rank counts matter for replicated (DDP) gradients: `layer_grad_nonfinite` is read from
        the local copy, so a fault on one rank after the gradient all-reduce shows only in that rank's
        row of the reduced slab - and every rank must take the same skip decision."""
        return (
            any(self.layer_grad_nonfinite)
            or any(r.loss_nonfinite or r.nonfinite_modules or r.nonfinite_layers for r in self.ranks)
        )

    def to_dict(self) -> dict:
        return asdict(self)


def decode_ranks(slab: list[float], world_size: int, nonfinite_layers: list[int]) -> list[RankStats]:
    """`nonfinite_layers`: per rank, from the reduced layer values and the layout (not in the slab)."""
    width = len(RANK_FIELDS)
    out = []
    for rank in range(world_size):
        row = slab[rank * width : (rank + 1) * width]
        get = lambda name: row[RANK_INDEX[name]]  # noqa: E731
        out.append(
            RankStats(
                rank=rank,
                loss=get("loss") if get("has_loss") else None,
                loss_nonfinite=bool(get("has_loss")) and not math.isfinite(get("loss")),
                nonfinite_modules=int(get("nonfinite_modules")),
                nonfinite_layers=nonfinite_layers[rank],
                step_seconds=get("step_seconds"),
            )
        )
    return out


def decode_activations(host: dict[str, list[float]], modules: tuple[str, ...], units: Optional[tuple[int, ...]]) -> ActivationStats:
    n = len(modules)
    acc = host["act_acc"]
    rows = [acc[i * n : (i + 1) * n] for i in range(5)]
    total, total_sq, count, nonfinite, saturated = rows
    mean, std, sat = [], [], []
    for i in range(n):
        c = count[i]
        m = total[i] / c if c else float("nan")
        var = total_sq[i] / c - m * m if c else float("nan")
        mean.append(m)
        std.append(math.sqrt(max(var, 0.0)) if _finite(var) else float("nan"))
        sat.append(saturated[i] / c if c else float("nan"))
    dead = None
    if "act_alive" in host and units is not None:
        dead, alive, offset = [], host["act_alive"], 0
        for i, u in enumerate(units):
            seg = alive[offset : offset + u]
            offset += u
            # NaN, not "all dead", for a module that produced nothing this step (or no agreed layout).
            dead.append(sum(1 for a in seg if a == 0) / u if u and count[i] else float("nan"))
    return ActivationStats(
        modules=modules,
        mean=mean,
        std=std,
        max_abs=host["act_max_abs"],
        nonfinite=[int(v) for v in nonfinite],
        saturated_ratio=sat,
        dead_ratio=dead,
    )


def find_nan_origin(stats: StepStats, first_bad_module: list[int], module_names: tuple[str, ...],
                    ranks_holding: Callable[[int], tuple[int, ...]]) -> Optional[NanOrigin]:
    """Forward before backward: a non-finite activation, else a loss, else a gradient. A module index
    with no name (activation statistics were switched off after this step was measured) is ignored.
    `ranks_holding(layer)`: the ranks a gradient's origin is named by (a pipeline stage's), or ()."""
    bad_act = [r.rank for r, m in zip(stats.ranks, first_bad_module) if 0 < m <= len(module_names)]
    if bad_act:
        return NanOrigin(stats.step, "activation", module_names[first_bad_module[bad_act[0]] - 1], tuple(bad_act))
    bad_loss = [r.rank for r in stats.ranks if r.loss_nonfinite]
    if bad_loss:
        return NanOrigin(stats.step, "loss", "loss", tuple(bad_loss))
    bad_layers = [i for i, bad in enumerate(stats.layer_grad_nonfinite) if bad]
    if bad_layers:
        # Backward runs from the output: the last layer in model order is where it entered.
        return NanOrigin(stats.step, "gradient", stats.layers[bad_layers[-1]], ranks_holding(bad_layers[-1]))
    return None


def _root(value: float) -> float:
    return math.sqrt(value) if value >= 0 else float("nan")


def _ratio(update_sumsq: float, base_sumsq: float) -> float:
    """||dw||/||w||; undefined (NaN) for an all-zero weight such as a freshly initialised bias, which
    would otherwise read as an infinite ratio and page on the first step of every run."""
    return math.sqrt(update_sumsq / base_sumsq) if base_sumsq > 0 else float("nan")


def build_step_stats(step: int, time: float, host: dict[str, list[float]], layers: tuple[str, ...],
                     world_size: int, learning_rates: list[float],
                     nonfinite_per_rank: Callable[[list[bool]], list[int]],
                     activations: Optional[tuple[tuple[str, ...], Optional[tuple[int, ...]]]] = None) -> StepStats:
    """A step's record from its reduced packet (`host`: each entry's values, as every rank reads them).
    `nonfinite_per_rank(layer_nonfinite)`: per rank, the non-finite layers it holds a piece of (the
    layout's). `activations`: the hooked modules' names and unit counts, when activation values rode
    on the step. Pure: the same host values give every rank the same record."""
    grad_sumsq = host["grad_sumsq"]
    layer_nonfinite = [not math.isfinite(v) for v in grad_sumsq]
    ranks = decode_ranks(host["ranks"], world_size, nonfinite_per_rank(layer_nonfinite))
    losses = [r.loss for r in ranks if r.loss is not None]
    stats = StepStats(
        step=step,
        time=time,
        world_size=world_size,
        layers=layers,
        grad_norm=_root(sum(grad_sumsq)),
        layer_grad_norm=[_root(v) for v in grad_sumsq],
        layer_grad_nonfinite=layer_nonfinite,
        learning_rates=learning_rates,
        ranks=ranks,
        loss_mean=sum(losses) / len(losses) if losses else None,
        loss_max=max(losses) if losses else None,
    )
    if "grad_max_abs" in host:
        stats.layer_grad_max_abs = host["grad_max_abs"]
        stats.layer_weight_norm = [_root(v) for v in host["weight_sumsq"]]
    if "update_sumsq" in host:
        stats.update_step = step - 1
        stats.layer_update_ratio = [_ratio(u, b) for u, b in zip(host["update_sumsq"], host["update_base_sumsq"])]
    if activations is not None and "act_acc" in host:
        stats.activations = decode_activations(host, *activations)
    return stats


def rank_values(host: dict[str, list[float]], world_size: int, name: str) -> list[float]:
    """One field of the per-rank slab, for every rank."""
    width, at = len(RANK_FIELDS), RANK_INDEX[name]
    return [host["ranks"][r * width + at] for r in range(world_size)]
