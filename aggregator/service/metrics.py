"""The aggregator's own health, served on its /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ...wire import metric_names as names


class AggregatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.evaluations = Counter(names.AGGREGATOR_EVALUATIONS_TOTAL, "Evaluation rounds over all rules.", registry=r)
        self.rule_failures = Counter(names.AGGREGATOR_RULE_FAILURES_TOTAL, "Rule queries that failed, by rule.", ["rule"], registry=r)
        self.duration = Histogram(names.AGGREGATOR_EVALUATION_DURATION, "Wall time of one evaluation round.", registry=r)
        self.last_evaluation = Gauge(names.AGGREGATOR_LAST_EVALUATION_TIMESTAMP, "Unix time of the last complete round.", registry=r)
        self.prometheus_up = Gauge(names.AGGREGATOR_PROMETHEUS_UP, "1 if the last round reached Prometheus.", registry=r)
        self.alertmanager_up = Gauge(names.AGGREGATOR_ALERTMANAGER_UP, "1 if the last delivery reached Alertmanager.", registry=r)
        self.notifications = Counter(names.AGGREGATOR_NOTIFICATIONS_TOTAL, "Alert deliveries to Alertmanager, by result.", ["result"], registry=r)
        self.pending_deliveries = Gauge(names.AGGREGATOR_PENDING_DELIVERIES, "Alerts waiting to reach Alertmanager.", registry=r)
        self.alerts = Gauge(names.AGGREGATOR_ALERTS, "Alerts held, by state.", ["state"], registry=r)
        for state in ("pending", "firing", "resolved"):
            self.alerts.labels(state)
        for result in ("success", "failure"):
            self.notifications.labels(result)
        self.prometheus_up.set(0)
        self.alertmanager_up.set(1)
