"""Rules evaluated in process over samples pushed into memory: the embedded default when no
Prometheus runs (the demo), and the reference the conformance test holds against promtool."""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional, Union

from ..rules.compile import CompiledRule, compile_rules
from ..rules.promql import Aggregate, Binary, Call, Expr, Selector
from ..rules.specs import RuleSet
from .alerts import AlertTracker, Transition
from .interpreter import LOOKBACK_MS, evaluate
from .series import SeriesStore

log = logging.getLogger("gradwatch.aggregator")


def lookback_s(expr: Expr) -> int:
    """How far back `expr` reads, so the store keeps just enough history."""
    if isinstance(expr, Call):
        return (expr.arg.range_s or 0) + expr.arg.offset_s
    if isinstance(expr, Aggregate):
        return lookback_s(expr.expr)
    if isinstance(expr, Binary):
        return max(lookback_s(expr.lhs), lookback_s(expr.rhs))
    return 0


def metric_lookbacks(expr: Expr, out: Optional[dict[str, int]] = None) -> dict[str, int]:
    """How far back `expr` reads each metric it names (seconds; 0: instant selectors only)."""
    out = {} if out is None else out
    if isinstance(expr, Selector):
        out[expr.metric] = max(out.get(expr.metric, 0), (expr.range_s or 0) + expr.offset_s)
    elif isinstance(expr, Call):
        metric_lookbacks(expr.arg, out)
    elif isinstance(expr, Aggregate):
        metric_lookbacks(expr.expr, out)
    elif isinstance(expr, Binary):
        metric_lookbacks(expr.lhs, out)
        metric_lookbacks(expr.rhs, out)
    return out


class RuleEngine:
    def __init__(self, rules: Union[RuleSet, Iterable[CompiledRule]]) -> None:
        compiled = compile_rules(rules) if isinstance(rules, RuleSet) else list(rules)
        # Skipped by name and reason, never silently: their alerts need Prometheus itself.
        self.skipped: dict[str, str] = {r.name: r.needs_prometheus for r in compiled if r.needs_prometheus}
        for name, why in self.skipped.items():
            log.info("gradwatch: rule %s is not evaluated in process: %s", name, why)
        self.rules = [r for r in compiled if not r.needs_prometheus]
        reads: dict[str, int] = {}
        for rule in self.rules:
            metric_lookbacks(rule.expr, reads)
        margin = LOOKBACK_MS // 1000 + 60  # instant selectors' lookback, and a scrape's slack
        self.store = SeriesStore(retention_s=margin, retention_by_metric={m: s + margin for m, s in reads.items()})
        self.tracker = AlertTracker(self.rules)
        self.errors: dict[str, str] = {}

    def add(self, samples: Iterable[tuple[str, Mapping[str, str], float]], now: float) -> None:
        self.store.add_many(samples, int(round(now * 1000)))

    def evaluate(self, now: float) -> list[Transition]:
        """Evaluate every rule at `now` (seconds); a rule that fails is reported and skipped."""
        t_ms = int(round(now * 1000))
        changes: list[Transition] = []
        for rule in self.rules:
            try:
                changes += self.tracker.update(rule.name, now, evaluate(rule.expr, self.store, t_ms))
                self.errors.pop(rule.name, None)
            except Exception as exc:  # one bad rule must not silence the others
                if rule.name not in self.errors:
                    log.error("gradwatch: rule %s failed to evaluate: %s", rule.name, exc)
                self.errors[rule.name] = str(exc)
        self.store.prune(t_ms)
        return changes
