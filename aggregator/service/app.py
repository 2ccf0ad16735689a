"""The aggregator's HTTP face (FastAPI): health, its own metrics, and the alerts it holds per job.
The evaluation loop runs in a background thread for the app's lifetime."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..evaluate.engine import lookback_s
from ..rules.compile import compile_rules
from ..rules.specs import RuleSet
from ...wire.commands import Ack, Command, CommandSpec
from .aggregator import Aggregator
from .command_store import CommandStore
from .clients import AlertmanagerClient, PrometheusClient, QuerySource
from .config import AggregatorSettings
from .metrics import AggregatorMetrics
from .policy import Policy
from .scrape import ScrapeSource
from .store import AlertStore

log = logging.getLogger("gradwatch.aggregator")


def build_aggregator(settings: AggregatorSettings, ruleset: RuleSet, commands: CommandStore) -> Aggregator:
    external = settings.external_url or f"http://{settings.host}:{settings.port}"
    rules = compile_rules(ruleset)
    source: QuerySource
    if settings.scrape:  # no Prometheus: read the agents' /metrics directly, evaluate in process
        for rule in rules:
            if rule.needs_prometheus:
                log.info("gradwatch aggregator: --scrape: rule %s is not evaluated: %s", rule.name, rule.needs_prometheus)
        rules = [r for r in rules if not r.needs_prometheus]
        history = max([lookback_s(r.expr) for r in rules] + [ruleset.policy.clip_window])
        source = ScrapeSource([str(url) for url in settings.scrape], settings.timeout, history)
    else:
        source = PrometheusClient(settings.base(settings.prometheus_url), settings.timeout)
    alertmanager = None if settings.alertmanager_url is None else AlertmanagerClient(settings.base(settings.alertmanager_url), settings.timeout)
    return Aggregator(
        rules=rules,
        prometheus=source,
        alertmanager=alertmanager,
        store=AlertStore(settings.state),
        metrics=AggregatorMetrics(),
        interval=settings.eval_interval or ruleset.interval,
        resend_interval=settings.resend_interval,
        max_backoff=settings.max_backoff,
        generator_url=external.rstrip("/") + "/api/v1/alerts",
        policy=Policy(ruleset.policy, commands, source),
    )


def _alert_json(alert) -> dict[str, Any]:
    return {
        "rule": alert.rule, "state": alert.state, "labels": alert.labels, "annotations": alert.annotations,
        "value": alert.value if alert.value == alert.value else None,
        "active_at": alert.active_at, "fired_at": alert.fired_at, "delivered": alert.sent_state == alert.state,
    }


def create_app(settings: AggregatorSettings, ruleset: RuleSet) -> FastAPI:
    commands = CommandStore(settings.state)
    aggregator = build_aggregator(settings, ruleset, commands)
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
            commands.close()

    app = FastAPI(title="gradwatch aggregator", lifespan=lifespan)
    app.state.aggregator = aggregator
    app.state.commands = commands

    def authorized(request: Request) -> None:
        """Bearer token on every command and audit endpoint; refused attempts are audited."""
        if settings.token is None:
            raise HTTPException(503, "commands are disabled: set GRADWATCH_AGGREGATOR_TOKEN")
        given = request.headers.get("authorization", "")
        expected = "Bearer " + settings.token.get_secret_value()
        if not secrets.compare_digest(given.encode(), expected.encode()):
            commands.audit(request.path_params.get("job", ""), "unauthorized", {"method": request.method, "path": request.url.path})
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

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

    @app.post("/api/v1/jobs/{job:path}/commands", status_code=201, dependencies=[Depends(authorized)])
    def submit(job: str, spec: CommandSpec) -> Command:
        """Queue a command for every rank of `job` (an operator's; the policy uses the store directly)."""
        return commands.submit(job, spec, "operator")

    @app.get("/api/v1/jobs/{job:path}/commands", dependencies=[Depends(authorized)])
    def pending(job: str) -> dict[str, Any]:
        """What the job's rank 0 polls: unacknowledged, unexpired commands, oldest first, with this
        server's time so the agent can judge the TTL left without trusting its own clock."""
        now = time.time()
        return {"now": now, "commands": [c.model_dump(mode="json") for c in commands.pending(job, now)]}

    @app.post("/api/v1/commands/{command_id}/ack", dependencies=[Depends(authorized)])
    def ack(command_id: str, body: Ack) -> Command:
        cmd = commands.acknowledge(command_id, body)
        if cmd is None:
            raise HTTPException(404, f"no command {command_id}")
        return cmd

    @app.get("/api/v1/commands", dependencies=[Depends(authorized)])
    def all_commands(job: Optional[str] = None) -> dict[str, Any]:
        return {"commands": [c.model_dump(mode="json") for c in commands.commands(job)]}

    @app.get("/api/v1/audit", dependencies=[Depends(authorized)])
    def audit(job: Optional[str] = None) -> dict[str, Any]:
        return {"events": commands.audit_log(job)}

    @app.get("/api/v1/rules")
    def rules() -> dict[str, Any]:
        return {"interval": aggregator.interval, "rules": [
            {"name": r.name, "alert": r.alert, "expr": r.promql, "for": r.for_s, "labels": r.labels} for r in aggregator.rules
        ]}

    return app
