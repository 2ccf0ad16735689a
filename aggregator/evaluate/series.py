"""Samples in memory, indexed by metric name: what the in-process evaluator reads instead of
Prometheus's TSDB. Old samples are pruned past the longest window any rule looks at, per metric
where the reader says so (one rule's long baseline need not keep every series that long)."""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping, Optional

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, `__name__` first among equals


def labels_of(name: str, labels: Mapping[str, str]) -> Labels:
    return tuple(sorted({**labels, "__name__": name}.items()))


class SeriesStore:
    def __init__(self, retention_s: int = 3600, retention_by_metric: Optional[Mapping[str, int]] = None) -> None:
        """`retention_s` for every metric not in `retention_by_metric` (metric name -> seconds)."""
        self.retention_ms = retention_s * 1000
        self.retention_by_metric_ms = {name: s * 1000 for name, s in (retention_by_metric or {}).items()}
        self._series: dict[str, dict[Labels, list[tuple[int, float]]]] = {}

    def add(self, name: str, labels: Mapping[str, str], t_ms: int, value: float) -> None:
        """Append one sample; samples of a series must arrive in time order (older ones are dropped,
        as Prometheus rejects out-of-order samples)."""
        points = self._series.setdefault(name, {}).setdefault(labels_of(name, labels), [])
        if points and t_ms <= points[-1][0]:
            if t_ms == points[-1][0]:
                points[-1] = (t_ms, value)
            return
        points.append((t_ms, value))

    def add_many(self, samples: Iterable[tuple[str, Mapping[str, str], float]], t_ms: int) -> None:
        for name, labels, value in samples:
            self.add(name, labels, t_ms, value)

    def prune(self, now_ms: int) -> None:
        for name, by_labels in self._series.items():
            cutoff = now_ms - self.retention_by_metric_ms.get(name, self.retention_ms)
            for key in list(by_labels):
                points = by_labels[key]
                keep = next((i for i, (ts, _) in enumerate(points) if ts >= cutoff), len(points))
                del points[:keep]
                if not points:
                    del by_labels[key]

    def select(self, name: str, matchers: tuple[tuple[str, str, str], ...] = ()) -> Iterator[tuple[Labels, list[tuple[int, float]]]]:
        """Series of `name` matching every (label, op, value), in Prometheus's (sorted label) order.
        Regexes are anchored, as in Prometheus."""
        for labels in sorted(self._series.get(name, {})):
            values = dict(labels)
            if all(_matches(values.get(k, ""), op, v) for k, op, v in matchers):
                yield labels, self._series[name][labels]


def _matches(actual: str, op: str, value: str) -> bool:
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    hit = re.fullmatch(value, actual) is not None
    return hit if op == "=~" else not hit


__all__ = ["Labels", "SeriesStore", "labels_of"]
