"""HTTP clients for Prometheus's query API and Alertmanager's v2 alert API (httpx, with timeouts)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Protocol, Union

import httpx

from ..evaluate.alerts import FIRING, Alert
from ..evaluate.interpreter import Sample
from ..rules.promql import Expr, render


class UpstreamError(RuntimeError):
    """Prometheus or Alertmanager refused a request."""


class Unreachable(UpstreamError):
    """No answer at all (connection refused, timeout): pointless to try the next query now."""


class QuerySource(Protocol):
    """Where rules are evaluated: Prometheus's HTTP API, or the agents scraped directly (scrape.py)."""

    def query(self, expr: Union[Expr, str], at: float) -> list[Sample]: ...

    def close(self) -> None: ...


class PrometheusClient:
    def __init__(self, base_url: str, timeout: float) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def query(self, expr: Union[Expr, str], at: float) -> list[Sample]:
        """The instant vector of `expr` (a rule's expression, or PromQL text) at Unix time `at`."""
        promql = expr if isinstance(expr, str) else render(expr)
        try:
            response = self._http.get("/api/v1/query", params={"query": promql, "time": f"{at:.3f}"})
        except httpx.HTTPError as exc:
            raise Unreachable(f"Prometheus unreachable: {exc!r}") from exc
        try:
            body = response.json()
        except ValueError:
            raise UpstreamError(f"Prometheus answered {response.status_code} with non-JSON") from None
        if body.get("status") != "success":
            raise UpstreamError(f"Prometheus query failed ({response.status_code}): {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise UpstreamError(f"expected an instant vector, got {data['resultType']}")
        return [Sample(tuple(sorted(r["metric"].items())), float(r["value"][1])) for r in data["result"]]

    def close(self) -> None:
        self._http.close()


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def alertmanager_payload(alert: Alert, now: float, valid_for: float, generator_url: str) -> dict[str, Any]:
    """One element of `POST /api/v2/alerts`. A firing alert is valid for `valid_for` seconds unless
    re-sent (so Alertmanager resolves it by itself if the aggregator dies); a resolved one ends when
    it resolved."""
    ends = now + valid_for if alert.state == FIRING else (alert.resolved_at or now)
    return {
        "labels": alert.labels,
        "annotations": alert.annotations,
        "startsAt": rfc3339(alert.active_at if alert.fired_at is None else alert.fired_at),
        "endsAt": rfc3339(ends),
        "generatorURL": generator_url,
    }


class AlertmanagerClient:
    def __init__(self, base_url: str, timeout: float) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def post(self, payload: Iterable[dict[str, Any]]) -> None:
        try:
            response = self._http.post("/api/v2/alerts", json=list(payload))
        except httpx.HTTPError as exc:
            raise Unreachable(f"Alertmanager unreachable: {exc!r}") from exc
        if response.status_code // 100 != 2:
            raise UpstreamError(f"Alertmanager refused the alerts ({response.status_code}): {response.text[:300]}")

    def close(self) -> None:
        self._http.close()
