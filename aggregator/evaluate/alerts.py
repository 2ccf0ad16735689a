"""Alert state per rule: pending -> firing -> resolved, with `for` durations, as Prometheus (and
Thanos Ruler, Grafana-managed alerts) do it. Shared by the in-process evaluator and the aggregator
service, which persists `Alert` rows so a restart keeps `active_at` and does not re-page.

Semantics (Prometheus `rules/alerting.go`): a sample in the rule's result makes an alert active
(pending, `active_at` = now); it fires once `now - active_at >= for`; when its sample disappears a
pending alert is dropped and a firing one becomes resolved (`resolved_at` = now) and is kept for
`RESOLVED_RETENTION_S` so its resolution keeps being delivered; if the condition comes back, a new
alert starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

from ..rules.compile import CompiledRule
from ..rules.templates import render
from .interpreter import EvaluationError, Sample

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"
RESOLVED_RETENTION_S = 15 * 60


@dataclass
class Alert:
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    state: str
    active_at: float
    fired_at: Optional[float] = None
    resolved_at: Optional[float] = None
    last_sent_at: Optional[float] = None  # aggregator bookkeeping: when Alertmanager last accepted it
    sent_state: Optional[str] = None  # the state Alertmanager last accepted
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.labels)

    @property
    def job(self) -> str:
        return self.labels.get("job", "")

    def to_dict(self) -> dict:
        return asdict(self)


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]


def alert_from_sample(rule: CompiledRule, sample: Sample) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations Prometheus would give the alert for `sample`."""
    template_labels = dict(sample.labels)
    labels = {k: v for k, v in sample.labels if k != "__name__"}
    labels.update(rule.labels)
    labels["alertname"] = rule.alert
    annotations = {k: render(v, template_labels, sample.value) for k, v in rule.annotations.items()}
    return labels, annotations


@dataclass(frozen=True)
class Transition:
    alert: Alert
    before: Optional[str]  # None: new
    after: str


class AlertTracker:
    """The active alerts of a set of rules, advanced one evaluation at a time."""

    def __init__(self, rules: Iterable[CompiledRule], alerts: Iterable[Alert] = (), hold_undelivered: bool = False) -> None:
        """`hold_undelivered`: keep a resolved alert past the retention until its resolution has
        been delivered (`sent_state == "resolved"`), so an Alertmanager outage loses nothing."""
        self.rules = {r.name: r for r in rules}
        self.hold_undelivered = hold_undelivered
        # A restored pending alert starts its `for` again: the time the evaluator was down proves nothing.
        self.alerts: dict[tuple[str, str], Alert] = {
            (a.rule, a.fingerprint): a for a in alerts if a.rule in self.rules and a.state != PENDING
        }

    def update(self, rule_name: str, now: float, samples: list[Sample]) -> list[Transition]:
        """Advance `rule_name` with the samples its expression gave at `now` (seconds)."""
        rule = self.rules[rule_name]
        changes: list[Transition] = []
        results: dict[str, tuple[Sample, dict[str, str], dict[str, str]]] = {}
        for sample in samples:  # validate everything before any state changes
            labels, annotations = alert_from_sample(rule, sample)
            fp = fingerprint(labels)
            if fp in results:
                raise EvaluationError(f"{rule.alert}: several series give the same alert labels {labels}")
            results[fp] = (sample, labels, annotations)
        seen = set(results)
        for fp, (sample, labels, annotations) in results.items():
            alert = self.alerts.get((rule_name, fp))
            if alert is not None and alert.state != RESOLVED:
                alert.value, alert.annotations = sample.value, annotations
                continue
            alert = Alert(rule_name, labels, annotations, sample.value, PENDING, active_at=now)
            self.alerts[(rule_name, fp)] = alert
            changes.append(Transition(alert, None, PENDING))
        for key, alert in list(self.alerts.items()):
            if key[0] != rule_name:
                continue
            if alert.fingerprint not in seen:
                if alert.state == PENDING or self._expired(alert, now):
                    del self.alerts[key]
                    if alert.state == PENDING:
                        changes.append(Transition(alert, PENDING, "dropped"))
                    continue
                if alert.state != RESOLVED:
                    alert.state, alert.resolved_at = RESOLVED, now
                    changes.append(Transition(alert, FIRING, RESOLVED))
                continue
            if alert.state == PENDING and now - alert.active_at >= rule.for_s:
                alert.state, alert.fired_at = FIRING, now
                changes.append(Transition(alert, PENDING, FIRING))
        return changes

    def _expired(self, alert: Alert, now: float) -> bool:
        if alert.resolved_at is None or now - alert.resolved_at <= RESOLVED_RETENTION_S:
            return False
        return not self.hold_undelivered or alert.sent_state == RESOLVED

    def firing(self, job: Optional[str] = None) -> list[Alert]:
        return [a for a in self.alerts.values() if a.state == FIRING and (job is None or a.job == job)]

    def active(self, job: Optional[str] = None) -> list[Alert]:
        return [a for a in self.alerts.values() if a.state != RESOLVED and (job is None or a.job == job)]
