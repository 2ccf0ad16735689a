"""The aggregator's own health, served on its /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AggregatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.evaluations = Counter("gradwatch_aggregator_evaluations_total", "Evaluation rounds over all rules.", registry=r)
        self.rule_failures = Counter("gradwatch_aggregator_rule_evaluation_failures_total", "Rule queries that failed, by rule.", ["rule"], registry=r)
        self.duration = Histogram("gradwatch_aggregator_evaluation_duration_seconds", "Wall time of one evaluation round.", registry=r)
        self.last_evaluation = Gauge("gradwatch_aggregator_last_evaluation_timestamp_seconds", "Unix time of the last complete round.", registry=r)
        self.prometheus_up = Gauge("gradwatch_aggregator_prometheus_up", "1 if the last round reached Prometheus.", registry=r)
        self.alertmanager_up = Gauge("gradwatch_aggregator_alertmanager_up", "1 if the last delivery reached Alertmanager.", registry=r)
        self.notifications = Counter("gradwatch_aggregator_notifications_total", "Alert deliveries to Alertmanager, by result.", ["result"], registry=r)
        self.pending_deliveries = Gauge("gradwatch_aggregator_pending_deliveries", "Alerts waiting to reach Alertmanager.", registry=r)
        self.alerts = Gauge("gradwatch_aggregator_alerts", "Alerts held, by state.", ["state"], registry=r)
        for state in ("pending", "firing", "resolved"):
            self.alerts.labels(state)
        for result in ("success", "failure"):
            self.notifications.labels(result)
        self.prometheus_up.set(0)
        self.alertmanager_up.set(1)
