"""A small typed PromQL subset: the one form every rule is compiled to.

Rules are built as these nodes, rendered to PromQL text for Prometheus (rule files, the aggregator's
HTTP queries) and interpreted directly by `gradwatch.aggregator.evaluate` when no Prometheus runs.
Keeping one tree for both is what makes the two evaluators agree (tests/test_conformance.py checks it
against promtool). Only what the built-in rules need is here; extending it means extending the
interpreter too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

ARITHMETIC = ("+", "-", "*", "/")
COMPARISON = (">", "<", ">=", "<=", "==", "!=")
SET_OPS = ("and", "or", "unless")
RANGE_FUNCTIONS = ("avg_over_time", "max_over_time", "min_over_time", "quantile_over_time", "increase", "rate")
AGGREGATIONS = ("max", "min", "count", "quantile", "topk")  # topk with k = 1 only


@dataclass(frozen=True)
class Selector:
    """`metric{label op "v"}` (op: = != =~ !~), optionally `[range] offset x` (seconds)."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = ()
    range_s: Optional[int] = None
    offset_s: int = 0


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Call:
    """A range-vector function; `param` is quantile_over_time's first argument."""

    fn: str
    arg: Selector
    param: Optional[float] = None


@dataclass(frozen=True)
class Time:
    """`time()`: the evaluation time in Unix seconds (a scalar), for ages of exported timestamps."""


@dataclass(frozen=True)
class Aggregate:
    op: str
    expr: "Expr"
    by: tuple[str, ...]
    param: Optional[float] = None


@dataclass(frozen=True)
class Binary:
    """`lhs op on(labels) group_left(include) rhs`. `on=None` matches on all labels but the name."""

    op: str
    lhs: "Expr"
    rhs: "Expr"
    on: Optional[tuple[str, ...]] = None
    group_left: Optional[tuple[str, ...]] = None


Expr = Union[Selector, Number, Time, Call, Aggregate, Binary]


def duration(seconds: int) -> str:
    """Prometheus duration text for whole seconds: 600 -> '10m', 90 -> '90s'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(expr: Expr) -> str:
    """PromQL text. Every nested binary expression is parenthesised: no reliance on precedence."""
    if isinstance(expr, Number):
        return number(expr.value)
    if isinstance(expr, Time):
        return "time()"
    if isinstance(expr, Selector):
        text = expr.metric
        if expr.matchers:
            text += "{" + ", ".join(f'{k}{op}"{v}"' for k, op, v in expr.matchers) + "}"
        if expr.range_s is not None:
            text += f"[{duration(expr.range_s)}]"
        if expr.offset_s:
            text += f" offset {duration(expr.offset_s)}"
        return text
    if isinstance(expr, Call):
        args = ([number(expr.param)] if expr.param is not None else []) + [render(expr.arg)]
        return f"{expr.fn}({', '.join(args)})"
    if isinstance(expr, Aggregate):
        inner = render(expr.expr)
        args = f"{number(expr.param)}, {inner}" if expr.param is not None else inner
        return f"{expr.op} by ({', '.join(expr.by)}) ({args})"
    if isinstance(expr, Binary):
        modifier = ""
        if expr.on is not None:
            modifier += f" on ({', '.join(expr.on)})"
        if expr.group_left is not None:
            modifier += f" group_left ({', '.join(expr.group_left)})"
        return f"{_operand(expr.lhs)} {expr.op}{modifier} {_operand(expr.rhs)}"
    raise TypeError(f"not a rule expression node: {expr!r}")


def _operand(expr: Expr) -> str:
    text = render(expr)
    return f"({text})" if isinstance(expr, Binary) else text


# ---- builders: keep rule definitions readable ----------------------------------------------------

def metric(name: str, range_s: Optional[int] = None, offset_s: int = 0, matchers: tuple = ()) -> Selector:
    return Selector(name, tuple(matchers), range_s=range_s, offset_s=offset_s)


def over_time(fn: str, name: str, range_s: int, offset_s: int = 0, param: Optional[float] = None) -> Call:
    return Call(fn, metric(name, range_s, offset_s), param)


def by_job(expr: Expr) -> Aggregate:
    """One series per job: drops target labels (`instance`, `pod`) so one-to-one matching cannot
    meet two series of a job (a restarted rank 0 on a new address, inside the window)."""
    return Aggregate("max", expr, ("job",))


def binary(op: str, lhs: Expr, rhs: Union[Expr, float], on: Optional[tuple[str, ...]] = None,
           group_left: Optional[tuple[str, ...]] = None) -> Binary:
    return Binary(op, lhs, Number(float(rhs)) if isinstance(rhs, (int, float)) else rhs, on, group_left)


def with_labels_of(expr: Expr, donor: Expr, labels: tuple[str, ...], on: tuple[str, ...] = ("job",)) -> Binary:
    """`expr` with `labels` copied from the one `donor` series per `on` group, value unchanged:
    `count by` is exactly 1 whatever the donor holds (a `donor * 0 + 1` would turn Inf into NaN)."""
    return binary("*", expr, Aggregate("count", donor, on + labels), on=on, group_left=labels)


def for_each(expr: Expr, donor: Expr, labels: tuple[str, ...], on: tuple[str, ...] = ("job",)) -> Binary:
    """`expr` (one series per `on` group) repeated for every `labels` combination of `donor` in its
    group, value unchanged: a `count by` times 0 is exactly 0 whatever the donor holds."""
    return binary("+", binary("*", Aggregate("count", donor, on + labels), 0), expr, on=on, group_left=())
