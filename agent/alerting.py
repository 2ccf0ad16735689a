"""gradwatch's rules evaluated inside the training process, over the agent's own series: the
embedded default when no Prometheus runs (the demo). It reads exactly what a scrape would return
(the same collector), so an alert here is the alert Prometheus + the aggregator would raise.
Runs on rank 0's publisher thread, never on the training step."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

from ..aggregator.evaluate import FIRING, RESOLVED, RuleEngine, Transition
from ..aggregator.rules import RuleSet, load_rules
from .exporter import AgentState, StatsCollector
from .stats import StepStats

log = logging.getLogger("gradwatch.agent")

AlertCallback = Callable[[Transition], None]


def log_alert(change: Transition) -> None:
    a = change.alert
    where = ", ".join(f"{k}={v}" for k, v in a.labels.items() if k in ("job", "layer", "rank", "kind"))
    level = logging.ERROR if change.after == FIRING else logging.INFO
    log.log(level, "gradwatch: ALERT %s %s (%s): %s", a.labels["alertname"], change.after.upper(), where, a.annotations.get("description", ""))


class EmbeddedRules:
    """A publisher listener that does what Prometheus + the aggregator would: once per rule-set
    interval (of step time) it "scrapes" the agent's series into a `RuleEngine`, evaluates every
    rule, and hands firing/resolved transitions to `on_alert`. Between scrapes a NaN still counts
    through `gradwatch_nonfinite_steps_total`, exactly as with Prometheus."""

    def __init__(self, state: AgentState, ruleset: Union[RuleSet, str, None] = None, on_alert: Optional[AlertCallback] = None) -> None:
        self.ruleset = ruleset if isinstance(ruleset, RuleSet) else load_rules(ruleset)
        self.engine = RuleEngine(self.ruleset)
        self.collector = StatsCollector(state)
        self.on_alert = on_alert or log_alert
        self.history: list[Transition] = []
        self._last_eval: Optional[float] = None
        self._callback_failed = False

    def __call__(self, stats: StepStats) -> None:
        if self._last_eval is not None and stats.time - self._last_eval < self.ruleset.interval:
            return
        self._last_eval = stats.time
        samples = [(s.name, s.labels, s.value) for family in self.collector.collect() for s in family.samples]
        self.engine.add(samples, stats.time)
        for change in self.engine.evaluate(stats.time):
            if change.after in (FIRING, RESOLVED):
                self.history.append(change)
                try:
                    self.on_alert(change)
                except Exception as exc:  # a failing callback must not switch embedded alerting off
                    if not self._callback_failed:
                        log.error("gradwatch: on_alert failed (alerts are still logged): %r", exc)
                        self._callback_failed = True
                    log_alert(change)

    def firing(self) -> list:
        return self.engine.tracker.firing()
