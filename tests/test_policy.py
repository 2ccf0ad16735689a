"""The remediation policy's decisions over a real SQLite command store: exploding -> clip to a
quantile of recent norms; repeated exploding or NaN -> lower the LR; the floor, the rate limit and
dry-run hold; vanishing sends nothing. Prometheus's answer to the quantile query is given by a
stand-in (the service tests run the policy against a real Prometheus)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from gradwatch.wire.commands import Ack
from gradwatch.aggregator.evaluate.alerts import FIRING, Alert, Transition
from gradwatch.aggregator.evaluate.interpreter import Sample
from gradwatch.aggregator.rules.promql import render
from gradwatch.aggregator.rules.specs import PolicySpec
from gradwatch.aggregator.service.command_store import CommandStore
from gradwatch.aggregator.service.policy import Policy


class RecentNorms:
    """Answers the policy's quantile query like Prometheus would, and records it."""

    def __init__(self, value: float) -> None:
        self.value, self.queries = value, []

    def query(self, expr, at: float) -> list[Sample]:
        self.queries.append(expr if isinstance(expr, str) else render(expr))  # the PromQL Prometheus would be sent
        return [Sample((("job", "j"),), self.value)]


def fired(rule: str, job: str = "j", layer: str = "fc1") -> Transition:
    return Transition(Alert(rule, {"job": job, "layer": layer, "alertname": rule}, {}, 1.0, FIRING, 0.0), "pending", FIRING)


def kinds(store: CommandStore, job: str = "j") -> list[tuple[str, float]]:
    return [(c.spec.kind, getattr(c.spec, "max_norm", getattr(c.spec, "factor", 0))) for c in store.commands(job)]


def test_policy_defaults_floor_rate_limit_and_dry_run(tmp_path: Path):
    store = CommandStore(tmp_path / "s.db")
    norms = RecentNorms(123.0)
    policy = Policy(PolicySpec(), store, norms)
    now = time.time()
    policy.react([fired("vanishing_gradient")], now)
    assert kinds(store) == []  # page only
    policy.react([fired("exploding_gradient"), fired("exploding_gradient", layer="fc2")], now)
    assert kinds(store) == [("set_clip_norm", 123.0)]  # one command per job per round
    assert norms.queries[0] == 'quantile_over_time(0.5, gradwatch_grad_norm{job="j"}[10m])'
    policy.react([fired("exploding_gradient", layer="fc3")], now + 1)  # same incident, clip not applied yet
    assert kinds(store) == [("set_clip_norm", 123.0)]
    store.acknowledge(store.commands("j")[0].id, Ack(step=7))
    # fires again after the clip was applied, together with NaN: one LR cut, no looser clip
    policy.react([fired("exploding_gradient"), fired("nan_gradient")], now + 2)
    assert kinds(store) == [("set_clip_norm", 123.0), ("scale_lr", 0.5)]
    for t in (3, 4, 5):
        policy.react([fired("nan_gradient")], now + t)
    # 0.5 * 0.5 * 0.5 = 0.125, a fourth halving would cross the 0.1 floor
    assert [k for k in kinds(store) if k[0] == "scale_lr"] == [("scale_lr", 0.5)] * 3
    events = [e["event"] for e in store.audit_log("j")]
    assert "policy_declined" in events and events.count("policy") == 4

    short = Policy(PolicySpec(repeat_window=1), store, RecentNorms(1.0))
    short.react([fired("exploding_gradient", job="w")], time.time())
    store.acknowledge(store.commands("w")[0].id, Ack(step=1))
    time.sleep(1.2)
    short.react([fired("exploding_gradient", job="w")], time.time())  # outside the window: no LR cut
    assert [k for k, _ in kinds(store, "w")] == ["set_clip_norm"]

    limited = Policy(PolicySpec(max_commands=1), store, norms)
    limited.react([fired("nan_gradient", job="k")], time.time())
    limited.react([fired("nan_gradient", job="k")], time.time())
    assert len(store.commands("k")) == 1

    dry = Policy(PolicySpec(dry_run=True), store, norms)
    dry.react([fired("exploding_gradient", job="d")], time.time())
    assert store.commands("d") == [] and store.audit_log("d")[0]["event"] == "policy_dry_run"


def test_signal_validates_before_sending():
    proc = subprocess.run([sys.executable, "-m", "gradwatch.cli", "signal", "--job", "j", "scale-lr", "2"],
                          capture_output=True, text=True, timeout=60, env={"GRADWATCH_AGGREGATOR_TOKEN": "t", "PATH": ""})
    assert proc.returncode == 2 and "factor" in proc.stderr and "less than or equal to 1" in proc.stderr
