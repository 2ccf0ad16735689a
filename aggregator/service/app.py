"""The aggregator's HTTP face (FastAPI): health, its own metrics, and the alerts it holds per job.
The evaluation loop runs in a background thread for the app's lifetime."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..rules.compile import compile_rules
from ..rules.specs import RuleSet
from .aggregator import Aggregator
from .clients import AlertmanagerClient, PrometheusClient
from .config import AggregatorSettings
from .metrics import AggregatorMetrics
from .store import AlertStore


def build_aggregator(settings: AggregatorSettings, ruleset: RuleSet) -> Aggregator:
    external = settings.external_url or f"http://{settings.host}:{settings.port}"
    return Aggregator(
        rules=compile_rules(ruleset),
        prometheus=PrometheusClient(settings.base(settings.prometheus_url), settings.timeout),
        alertmanager=AlertmanagerClient(settings.base(settings.alertmanager_url), settings.timeout),
        store=AlertStore(settings.state),
        metrics=AggregatorMetrics(),
        interval=settings.eval_interval or ruleset.interval,
        resend_interval=settings.resend_interval,
        max_backoff=settings.max_backoff,
        generator_url=external.rstrip("/") + "/api/v1/alerts",
    )


def _alert_json(alert) -> dict[str, Any]:
    return {
        "rule": alert.rule, "state": alert.state, "labels": alert.labels, "annotations": alert.annotations,
        "value": alert.value if alert.value == alert.value else None,
        "active_at": alert.active_at, "fired_at": alert.fired_at, "delivered": alert.sent_state == alert.state,
    }


def create_app(settings: AggregatorSettings, ruleset: RuleSet) -> FastAPI:
    aggregator = build_aggregator(settings, ruleset)
    stop = threading.Event()
    thread = threading.Thread(target=aggregator.run, args=(stop,), name="gradwatch-aggregator", daemon=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=settings.timeout + aggregator.interval)
            aggregator.store.close()

    app = FastAPI(title="gradwatch aggregator", lifespan=lifespan)
    app.state.aggregator = aggregator

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        alive = thread.is_alive()
        body = {"status": "ok" if alive else "evaluation loop stopped", "last_evaluation": aggregator.last_round}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(aggregator.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/alerts")
    def alerts(job: Optional[str] = None) -> dict[str, Any]:
        """Pending and firing alerts, grouped by job (`?job=` for one)."""
        by_job: dict[str, list] = {}
        for alert in aggregator.active(job):
            by_job.setdefault(alert.job, []).append(_alert_json(alert))
        return {"jobs": by_job}

    @app.get("/api/v1/rules")
    def rules() -> dict[str, Any]:
        return {"interval": aggregator.interval, "rules": [
            {"name": r.name, "alert": r.alert, "expr": r.promql, "for": r.for_s, "labels": r.labels} for r in aggregator.rules
        ]}

    return app
