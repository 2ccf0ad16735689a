"""The aggregator service against a real Prometheus and a real Alertmanager: delivery and
resolution, its API and metrics, restarts from SQLite, and outages of either upstream. The scraped
target is a real prometheus_client endpoint whose values the test sets (deterministic faults); the
end-to-end test with real training jobs is test_e2e_alerting.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from conftest import free_port
from servers import Pager, aggregator, alertmanager, http_json, http_text, prometheus, running, wait_for

RULES = """
interval: 1s
rules:
  nan_gradient: {window: 3s}
  dead_units: {for: 3s}
"""


class Target:
    """A scrape target exposing agent-named series for job `svc`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.nonfinite = Gauge("gradwatch_rank_nonfinite", "", ["job", "rank"], registry=self.registry)
        self.dead = Gauge("gradwatch_activation_dead_ratio", "", ["job", "layer"], registry=self.registry)
        for rank in ("0", "1"):
            self.nonfinite.labels("svc", rank).set(0)
        self.dead.labels("svc", "relu1").set(0.1)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.address = f"127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stack(tmp_path: Path):
    target, pager = Target(), Pager()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    yield target, pager, rules
    target.close()
    pager.close()


def metric(url: str, name: str) -> float:
    for line in http_text(url + "/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {url}/metrics")


def test_alert_is_delivered_listed_and_resolved(tmp_path: Path, stack):
    target, pager, rules = stack
    prom, am = prometheus(tmp_path, [target.address]), alertmanager(tmp_path, pager.url)
    with running(prom, am):
        agg = aggregator(tmp_path, prom.url, am.url, rules, tmp_path / "state.db")
        with running(agg):
            wait_for(lambda: metric(agg.url, "gradwatch_aggregator_evaluations_total") >= 3, 30, "evaluations")
            assert pager.alerts() == []  # healthy: nothing pages
            target.dead.labels("svc", "relu1").set(0.9)
            page = wait_for(lambda: pager.alerts("firing", alertname="GradwatchDeadUnits"), 40, "dead-units page")[0]
            assert page["labels"]["job"] == "svc" and page["labels"]["layer"] == "relu1"
            assert page["annotations"]["description"].startswith("90% of layer relu1's units are dead")
            assert page["receiver"] == "training-chat"  # warning: not the pager route
            listed = http_json(agg.url + "/api/v1/alerts?job=svc")["jobs"]["svc"]
            assert [a["labels"]["alertname"] for a in listed] == ["GradwatchDeadUnits"] and listed[0]["state"] == "firing"
            assert http_json(agg.url + "/api/v1/alerts?job=other")["jobs"] == {}
            assert metric(agg.url, "gradwatch_aggregator_prometheus_up") == 1
            assert metric(agg.url, "gradwatch_aggregator_alertmanager_up") == 1
            assert http_json(agg.url + "/healthz")["status"] == "ok"

            target.dead.labels("svc", "relu1").set(0.1)
            wait_for(lambda: pager.alerts("resolved", alertname="GradwatchDeadUnits"), 40, "resolution")
            assert http_json(agg.url + "/api/v1/alerts")["jobs"] == {}


def test_restart_keeps_open_alerts_and_delivers_what_it_owed(tmp_path: Path, stack):
    target, pager, rules = stack
    prom, am = prometheus(tmp_path, [target.address]), alertmanager(tmp_path, pager.url)
    state, port = tmp_path / "state.db", free_port()
    with running(prom, am):
        urls = (prom.url, am.url)
        first = aggregator(tmp_path, *urls, rules, state, port=port)
        with running(first):
            target.nonfinite.labels("svc", "1").set(4)
            wait_for(lambda: pager.alerts("firing", alertname="GradwatchNanGradient"), 40, "NaN page")
            before = http_json(first.url + "/api/v1/alerts")["jobs"]["svc"][0]
        # restarted with the alert still open: same alert (same start), no second page
        second = aggregator(tmp_path, *urls, rules, state, port=port)
        with running(second):
            after = http_json(second.url + "/api/v1/alerts")["jobs"]["svc"][0]
            assert (after["active_at"], after["fired_at"], after["state"]) == (before["active_at"], before["fired_at"], "firing")
            time.sleep(6)  # past a resend interval: re-sent to Alertmanager, but not re-paged
            assert len(pager.alerts("firing", alertname="GradwatchNanGradient")) == 1
        # the fault clears while no aggregator runs; the next one still sends the resolution
        target.nonfinite.labels("svc", "1").set(0)
        time.sleep(5)
        third = aggregator(tmp_path, *urls, rules, state, port=port)
        with running(third):
            wait_for(lambda: pager.alerts("resolved", alertname="GradwatchNanGradient"), 40, "resolution after restart")


def test_survives_alertmanager_and_prometheus_outages(tmp_path: Path, stack):
    target, pager, rules = stack
    prom_port, am_port = free_port(), free_port()
    prom, am = prometheus(tmp_path, [target.address], port=prom_port), alertmanager(tmp_path, pager.url, port=am_port)
    agg = aggregator(tmp_path, f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}", rules, tmp_path / "state.db")
    with running(agg):
        # neither upstream exists yet: the service runs, says so, and holds nothing it could lose
        wait_for(lambda: metric(agg.url, "gradwatch_aggregator_rule_evaluation_failures_total") >= 2, 30, "failures counted")
        assert metric(agg.url, "gradwatch_aggregator_prometheus_up") == 0
        assert http_json(agg.url + "/healthz")["status"] == "ok"
        with running(prom):
            target.nonfinite.labels("svc", "0").set(2)
            wait_for(lambda: http_json(agg.url + "/api/v1/alerts").get("jobs", {}).get("svc"), 40, "alert firing without Alertmanager")
            wait_for(lambda: metric(agg.url, "gradwatch_aggregator_alertmanager_up") == 0, 30, "alertmanager_up 0")
            assert metric(agg.url, "gradwatch_aggregator_pending_deliveries") >= 1
            assert pager.alerts() == []
            with running(am):  # Alertmanager comes up: the held alert is delivered (backoff capped at 2 s here)
                page = wait_for(lambda: pager.alerts("firing", alertname="GradwatchNanGradient"), 90, "delivery after outage")[0]
                assert page["receiver"] == "training-pager"  # critical
                assert metric(agg.url, "gradwatch_aggregator_alertmanager_up") == 1
        # Prometheus gone again: state is kept (no false resolution), the service stays healthy
        fails = metric(agg.url, "gradwatch_aggregator_rule_evaluation_failures_total")
        wait_for(lambda: metric(agg.url, "gradwatch_aggregator_rule_evaluation_failures_total") > fails, 30, "failures while down")
        assert http_json(agg.url + "/api/v1/alerts")["jobs"]["svc"][0]["state"] == "firing"
        assert http_json(agg.url + "/healthz")["status"] == "ok"
        assert agg.proc.poll() is None


def test_without_prometheus_it_scrapes_the_agent_directly(tmp_path: Path):
    """`--scrape URL --alertmanager-url none`: a real agent (one process) serves /metrics; the aggregator
    reads it itself, evaluates the rules in process and serves the alert - no Prometheus, no Alertmanager."""
    import subprocess
    import sys

    import torch
    from torch import nn

    from gradwatch.agent import HealthAgent

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = HealthAgent(model, opt, job="scraped", metrics_port=0, metrics_addr="127.0.0.1", activation_every=0)
    rules = tmp_path / "rules.yaml"
    rules.write_text("interval: 1s\nrules:\n  nan_gradient: {window: 10s}\n")
    port = free_port()
    agg = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "aggregator", "--scrape",
                            f"http://127.0.0.1:{agent.metrics_port}/metrics", "--alertmanager-url", "none", "--port", str(port),
                            "--state", str(tmp_path / "state.db"), "--rules", str(rules), "--eval-interval", "1s"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_json(f"{base}/healthz"), 30, "the aggregator")

        def train(steps: int, nan_at: int = -1) -> None:
            for step in range(steps):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                (loss * float("nan") if step == nan_at else loss).backward()
                agent.step(opt, loss=loss * float("nan") if step == nan_at else loss)
                opt.zero_grad()
                time.sleep(0.2)

        train(10)
        assert http_json(f"{base}/api/v1/alerts")["jobs"] == {}  # healthy: nothing
        train(10, nan_at=2)
        firing = wait_for(lambda: [a for a in http_json(f"{base}/api/v1/alerts?job=scraped")["jobs"].get("scraped", [])
                                   if a["state"] == "firing"], 15, "the NaN alert from the scraped series")
        assert firing[0]["labels"]["alertname"] == "GradwatchNanGradient" and firing[0]["labels"]["kind"] == "loss"
        assert not firing[0]["delivered"]  # no Alertmanager: served by the API only
        metrics = http_text(f"{base}/metrics")
        assert "gradwatch_aggregator_prometheus_up 1.0" in metrics  # the scrape source counts as reached
        evaluated = {r["name"] for r in http_json(f"{base}/api/v1/rules")["rules"]}
        assert "training_stalled" in evaluated and "agent_down" not in evaluated  # it needs Prometheus's targets
    finally:
        agg.terminate()
        out, _ = agg.communicate(timeout=30)
        agent.close()
    assert "Traceback" not in out, out[-3000:]
    assert "rule agent_down is not evaluated: needs Prometheus's scrape targets" in out
