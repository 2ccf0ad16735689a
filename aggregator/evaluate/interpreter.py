"""Evaluate a rule expression at one instant over an in-memory `SeriesStore`, with Prometheus 2.x
semantics for exactly the node types in `rules.promql`:

- instant selectors take the latest sample in [t - 5m, t]; range selectors every sample in
  [t - offset - range, t - offset] (both ends closed, as in Prometheus 2.x);
- functions and arithmetic drop `__name__`; filtering comparisons keep the left side's labels and value;
- vector matching by `on(...)` / all labels but the name, `group_left(...)` copying labels from the
  one side; `and`/`or`/`unless` by signature;
- `max`/`min`/`count`/`quantile`/`topk` (k = 1) with Prometheus's NaN handling, `increase` and
  `rate` with their extrapolation;
- `time()` is the evaluation time in seconds.

tests/test_conformance.py holds this to promtool's answers on the same series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ..rules.promql import ARITHMETIC, COMPARISON, Aggregate, Binary, Call, Expr, Number, Selector, Time
from .series import Labels, SeriesStore

LOOKBACK_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class Sample:
    labels: Labels  # sorted (name, value) pairs, `__name__` included where Prometheus keeps it
    value: float

    def get(self, name: str) -> str:
        return dict(self.labels).get(name, "")


Vector = list[Sample]
Value = Union[float, Vector]


class EvaluationError(ValueError):
    """The expression is not valid over this data (e.g. duplicate series on the 'one' side)."""


def evaluate(expr: Expr, store: SeriesStore, t_ms: int) -> Vector:
    """The instant vector `expr` yields at `t_ms` (Unix milliseconds)."""
    result = _eval(expr, store, t_ms)
    if not isinstance(result, list):
        raise EvaluationError("a rule expression must yield an instant vector, not a scalar")
    return result


def _eval(expr: Expr, store: SeriesStore, t: int) -> Value:
    if isinstance(expr, Number):
        return expr.value
    if isinstance(expr, Time):
        return t / 1000
    if isinstance(expr, Selector):
        return _instant(expr, store, t)
    if isinstance(expr, Call):
        return _call(expr, store, t)
    if isinstance(expr, Aggregate):
        inner = _eval(expr.expr, store, t)
        assert isinstance(inner, list)
        return _aggregate(expr, inner)
    if isinstance(expr, Binary):
        return _binary(expr, _eval(expr.lhs, store, t), _eval(expr.rhs, store, t))
    raise TypeError(f"cannot evaluate {expr!r}")


def _instant(sel: Selector, store: SeriesStore, t: int) -> Vector:
    out = []
    for labels, points in store.select(sel.metric, sel.matchers):
        at = t - sel.offset_s * 1000
        latest = None
        for ts, v in reversed(points):
            if ts <= at:
                latest = (ts, v) if ts >= at - LOOKBACK_MS else None
                break
        if latest is not None:
            out.append(Sample(labels, latest[1]))
    return out


def _drop_name(labels: Labels) -> Labels:
    return tuple(kv for kv in labels if kv[0] != "__name__")


# ---- range functions -----------------------------------------------------------------------------

def _call(call: Call, store: SeriesStore, t: int) -> Vector:
    sel = call.arg
    end = t - sel.offset_s * 1000
    start = end - (sel.range_s or 0) * 1000
    out = []
    for labels, points in store.select(sel.metric, sel.matchers):
        window = [(ts, v) for ts, v in points if start <= ts <= end]
        if not window:
            continue
        values = [v for _, v in window]
        if call.fn in ("increase", "rate"):
            value = _increase(window, start, end, per_second=call.fn == "rate")
            if value is None:
                continue
        elif call.fn == "max_over_time":
            value = values[0]
            for v in values:
                if v > value or math.isnan(value):
                    value = v
        elif call.fn == "min_over_time":
            value = values[0]
            for v in values:
                if v < value or math.isnan(value):
                    value = v
        elif call.fn == "avg_over_time":
            value = _mean(values)
        elif call.fn == "quantile_over_time":
            value = _quantile(call.param, values)
        else:
            raise TypeError(f"unknown function {call.fn}")
        out.append(Sample(_drop_name(labels), value))
    return out


def _mean(values: list[float]) -> float:
    """Prometheus's incremental mean (with its handling of infinities)."""
    mean = 0.0
    count = 0.0
    for v in values:
        count += 1
        if math.isinf(mean):
            if math.isinf(v) and (mean > 0) == (v > 0):
                continue
            if not math.isinf(v) and not math.isnan(v):
                continue
        mean += v / count - mean / count
    return mean


def _quantile(q: Optional[float], values: list[float]) -> float:
    if not values:
        return math.nan
    q = 0.5 if q is None else q
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(values, key=lambda v: (0, 0.0) if math.isnan(v) else (1, v))  # NaN sorts first
    n = len(ordered)
    rank = q * (n - 1)
    lower = max(0, math.floor(rank))
    upper = min(n - 1, lower + 1)
    weight = rank - math.floor(rank)
    return ordered[int(lower)] * (1 - weight) + ordered[int(upper)] * weight


def _increase(window: list[tuple[int, float]], start: int, end: int, per_second: bool = False) -> Optional[float]:
    """Prometheus's extrapolated counter increase over [start, end]; per second of the range for
    `rate` (divided into the factor first, as Prometheus does, so the float rounding agrees)."""
    if len(window) < 2:
        return None
    first_t, first_v = window[0]
    last_t, last_v = window[-1]
    result = last_v - first_v
    previous = 0.0
    for _, v in window:
        if v < previous:
            result += previous  # counter reset
        previous = v
    to_start = (first_t - start) / 1000
    to_end = (end - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average_gap = sampled / (len(window) - 1)
    if result > 0 and first_v >= 0:
        to_zero = sampled * (first_v / result)
        if to_zero < to_start:
            to_start = to_zero
    threshold = average_gap * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average_gap / 2
    interval += to_end if to_end < threshold else average_gap / 2
    factor = interval / sampled
    if per_second:
        factor /= (end - start) / 1000
    return result * factor


# ---- aggregation ---------------------------------------------------------------------------------

def _aggregate(agg: Aggregate, vector: Vector) -> Vector:
    groups: dict[Labels, list[Sample]] = {}
    for s in sorted(vector, key=lambda s: s.labels):
        key = tuple((name, s.get(name)) for name in sorted(agg.by) if s.get(name))
        groups.setdefault(key, []).append(s)
    out = []
    for key, members in groups.items():
        values = [s.value for s in members]
        if agg.op == "topk":  # k = 1: the first largest in series order, numbers before NaN
            best = members[0]
            for s in members[1:]:
                if best.value < s.value or (math.isnan(best.value) and not math.isnan(s.value)):
                    best = s
            if int(agg.param or 1) != 1:
                raise EvaluationError("topk is implemented for k = 1 only")
            out.append(best)
            continue
        if agg.op == "max":
            value = values[0]
            for v in values[1:]:
                if value < v or math.isnan(value):
                    value = v
        elif agg.op == "min":
            value = values[0]
            for v in values[1:]:
                if value > v or math.isnan(value):
                    value = v
        elif agg.op == "count":
            value = float(len(values))
        elif agg.op == "quantile":
            value = _quantile(agg.param, values)
        else:
            raise TypeError(f"unknown aggregation {agg.op}")
        out.append(Sample(key, value))
    return out


# ---- binary operators ----------------------------------------------------------------------------

def _arith(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            if a == 0 or math.isnan(a):
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)
        return a / b
    raise TypeError(op)


def _compare(op: str, a: float, b: float) -> bool:
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b}[op]


def _signature(s: Sample, on: Optional[tuple[str, ...]]) -> Labels:
    if on is None:
        return _drop_name(s.labels)
    return tuple((name, s.get(name)) for name in sorted(on))


def _binary(b: Binary, lhs: Value, rhs: Value) -> Value:
    if b.op in ("and", "or", "unless"):
        assert isinstance(lhs, list) and isinstance(rhs, list)
        return _set_op(b, lhs, rhs)
    if not isinstance(lhs, list) and not isinstance(rhs, list):
        if b.op in COMPARISON:
            raise EvaluationError("comparison between scalars needs `bool`")
        return _arith(b.op, lhs, rhs)
    if not isinstance(lhs, list) or not isinstance(rhs, list):
        return _vector_scalar(b.op, lhs, rhs)
    return _vector_vector(b, lhs, rhs)


def _vector_scalar(op: str, lhs: Value, rhs: Value) -> Vector:
    vector_left = isinstance(lhs, list)
    vector = lhs if vector_left else rhs
    scalar = rhs if vector_left else lhs
    out = []
    for s in vector:  # type: ignore[union-attr]
        a, b = (s.value, scalar) if vector_left else (scalar, s.value)
        if op in ARITHMETIC:
            out.append(Sample(_drop_name(s.labels), _arith(op, a, b)))
        elif _compare(op, a, b):
            out.append(s)  # filter: the vector's sample, value unchanged
    return out


def _vector_vector(b: Binary, lhs: Vector, rhs: Vector) -> Vector:
    if not lhs or not rhs:
        return []
    many_to_one = b.group_left is not None
    right: dict[Labels, Sample] = {}
    for s in rhs:
        sig = _signature(s, b.on)
        if sig in right:
            raise EvaluationError(f"found duplicate series for the match group {dict(sig)} on the right hand-side")
        right[sig] = s
    out = []
    seen: dict[Labels, Labels] = {}
    for s in lhs:
        sig = _signature(s, b.on)
        other = right.get(sig)
        if other is None:
            continue
        if b.op in ARITHMETIC:
            value, keep = _arith(b.op, s.value, other.value), True
        else:
            value, keep = s.value, _compare(b.op, s.value, other.value)
        if not keep:  # Prometheus filters before it checks one-to-one uniqueness
            continue
        if not many_to_one:
            if sig in seen:
                raise EvaluationError(f"multiple matches for labels {dict(sig)}: many-to-one matching must be explicit (group_left)")
            seen[sig] = s.labels
        labels = dict(s.labels)
        if b.op in ARITHMETIC:
            labels.pop("__name__", None)
        if not many_to_one and b.on is not None:
            labels = {k: v for k, v in labels.items() if k in b.on}
        for name in b.group_left or ():
            if other.get(name):
                labels[name] = other.get(name)
            else:
                labels.pop(name, None)
        result = tuple(sorted(labels.items()))
        if many_to_one:
            if result in seen:
                raise EvaluationError(f"multiple matches for labels {dict(result)}: grouping labels must ensure uniqueness")
            seen[result] = result
        out.append(Sample(result, value))
    return out


def _set_op(b: Binary, lhs: Vector, rhs: Vector) -> Vector:
    right = {_signature(s, b.on) for s in rhs}
    if b.op == "and":
        return [s for s in lhs if _signature(s, b.on) in right]
    if b.op == "unless":
        return [s for s in lhs if _signature(s, b.on) not in right]
    left = {_signature(s, b.on) for s in lhs}
    return lhs + [s for s in rhs if _signature(s, b.on) not in left]
