"""The aggregator's loop: query every rule from Prometheus, advance alert state, persist it, and
deliver to Alertmanager. Nothing here may raise out of `run`: an unreachable Prometheus leaves alert
state untouched (no false resolutions), an unreachable Alertmanager is retried with exponential
backoff while undelivered alerts wait in SQLite."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ..evaluate.alerts import FIRING, PENDING, RESOLVED, Alert, AlertTracker, Transition
from ..rules.compile import CompiledRule
from .clients import AlertmanagerClient, QuerySource, Unreachable, UpstreamError, alertmanager_payload
from .metrics import AggregatorMetrics
from .policy import Policy
from .store import AlertStore

log = logging.getLogger("gradwatch.aggregator")


class Aggregator:
    def __init__(
        self,
        rules: list[CompiledRule],
        prometheus: QuerySource,
        alertmanager: Optional[AlertmanagerClient],
        store: AlertStore,
        metrics: AggregatorMetrics,
        interval: float,
        resend_interval: float,
        max_backoff: float,
        generator_url: str,
        policy: Optional["Policy"] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.rules = rules
        self.prometheus, self.alertmanager, self.store, self.metrics = prometheus, alertmanager, store, metrics
        self.interval, self.resend_interval, self.max_backoff = interval, resend_interval, max_backoff
        self.generator_url = generator_url
        self.clock = clock
        self.lock = threading.Lock()
        # With no Alertmanager (None: alerts are served by the API only) nothing waits for delivery.
        self.tracker = AlertTracker(rules, store.load(), hold_undelivered=alertmanager is not None)
        self.last_round: Optional[float] = None
        self._backoff = 0.0  # Alertmanager
        self._next_delivery = 0.0
        self._query_backoff = 0.0  # Prometheus: added to the interval while it does not answer
        self._down: set[str] = set()
        restored = [a for a in self.tracker.alerts.values() if a.state != RESOLVED]
        if restored:
            log.info("gradwatch aggregator: restored %d open alert(s) from the state file", len(restored))

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate_once(self, now: float) -> list[Transition]:
        changes: list[Transition] = []
        reached = False
        for rule in self.rules:
            try:
                samples = self.prometheus.query(rule.expr, now)
                reached = True
                with self.lock:
                    changes += self.tracker.update(rule.name, now, samples)
            except Unreachable as exc:  # the other rules would only wait for the same timeout
                self.metrics.rule_failures.labels(rule.name).inc()
                self._report_down("prometheus", exc)
                break
            except Exception as exc:  # this rule (its query, its data) is at fault, not the others
                self.metrics.rule_failures.labels(rule.name).inc()
                log.error("gradwatch aggregator: rule %s failed: %s", rule.name, exc)
        self.metrics.prometheus_up.set(int(reached))
        if reached:
            self._query_backoff = 0.0
            self._report_up("prometheus")
        else:
            self._query_backoff = min(self.max_backoff, max(1.0, self._query_backoff * 2))
        for change in changes:
            if change.after in (FIRING, RESOLVED):
                a = change.alert
                log.warning("gradwatch aggregator: %s %s %s", a.labels.get("alertname"), change.after, a.labels)
        self.metrics.evaluations.inc()
        self.metrics.last_evaluation.set(now)
        self.last_round = now
        self._persist()
        if self.policy is not None:
            try:
                self.policy.react(changes, now)
            except Exception:  # the policy must never stop alerting
                log.exception("gradwatch aggregator: remediation policy failed")
        return changes

    # ---- delivery ------------------------------------------------------------------------------

    def _due(self, alert: Alert, now: float) -> bool:
        if alert.state == PENDING:
            return False
        if alert.sent_state != alert.state:
            return True
        return alert.last_sent_at is None or now - alert.last_sent_at >= self.resend_interval

    def deliver(self, now: float) -> int:
        """Send what is due; returns how many alerts Alertmanager accepted."""
        with self.lock:
            due = [a for a in self.tracker.alerts.values() if self._due(a, now)]
            undelivered = sum(1 for a in self.tracker.alerts.values() if a.state != PENDING and a.sent_state != a.state)
        self.metrics.pending_deliveries.set(undelivered)
        if self.alertmanager is None or not due or now < self._next_delivery:
            return 0
        # Alertmanager resolves a firing alert by itself at endsAt: outlast 4 rounds, backoff included.
        valid_for = 4 * max(self.interval, self.resend_interval) + self.max_backoff
        try:
            self.alertmanager.post(alertmanager_payload(a, now, valid_for, self.generator_url) for a in due)
        except UpstreamError as exc:
            self.metrics.notifications.labels("failure").inc()
            self.metrics.alertmanager_up.set(0)
            self._backoff = min(self.max_backoff, max(1.0, self._backoff * 2))
            self._next_delivery = now + self._backoff
            self._report_down("alertmanager", exc)
            return 0
        with self.lock:
            for a in due:
                a.sent_state, a.last_sent_at = a.state, now
        self.metrics.notifications.labels("success").inc(len(due))
        self.metrics.alertmanager_up.set(1)
        self.metrics.pending_deliveries.set(0)
        self._backoff, self._next_delivery = 0.0, 0.0
        self._report_up("alertmanager")
        self._persist()
        return len(due)

    # ---- loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Evaluate every `interval` until `stop`; never raises."""
        while not stop.is_set():
            started = self.clock()
            # Separately: a failure to evaluate or to persist (a full disk) must not stop delivery.
            for step in (lambda: self.evaluate_once(started), lambda: self.deliver(self.clock())):
                try:
                    step()
                except Exception:  # the loop must survive anything
                    log.exception("gradwatch aggregator: round failed; retrying next interval")
            stop.wait(max(0.0, self.interval + self._query_backoff - (self.clock() - started)))

    def active(self, job: Optional[str] = None) -> list[Alert]:
        with self.lock:
            return self.tracker.active(job)

    def _persist(self) -> None:
        with self.lock:
            alerts = list(self.tracker.alerts.values())
        for state in (PENDING, FIRING, RESOLVED):
            self.metrics.alerts.labels(state).set(sum(1 for a in alerts if a.state == state))
        self.store.replace_all(alerts)

    def _report_down(self, upstream: str, exc: Exception) -> None:
        if upstream not in self._down:
            self._down.add(upstream)
            log.error("gradwatch aggregator: %s: %s (retrying; alerts are kept)", upstream, exc)

    def _report_up(self, upstream: str) -> None:
        if upstream in self._down:
            self._down.discard(upstream)
            log.warning("gradwatch aggregator: %s reachable again", upstream)
