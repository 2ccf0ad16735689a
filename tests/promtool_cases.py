"""Write and run `promtool test rules` files from Python data: the series every rule test feeds,
the alerts expected at each evaluation time, and promtool's verdict."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import pytest
import yaml

from gradwatch.aggregator.evaluate import FIRING, RuleEngine
from gradwatch.aggregator.rules import RuleSet, export_text


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: install Debian's prometheus and prometheus-alertmanager (make test does)")
    return path


def series_text(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


STALE = "stale"  # a staleness marker: what Prometheus writes when a scrape fails or a target goes


def value_text(v: Union[None, float, str]) -> str:
    if v is None:
        return "_"
    if v == STALE:
        return STALE
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    return repr(float(v))


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    values: list[Union[None, float, str]]  # one per interval from t=0; None: no sample; STALE: a staleness marker


@dataclass
class Expected:
    eval_time: int  # seconds
    alertname: str
    alerts: list[dict] = field(default_factory=list)  # {"exp_labels": ..., "exp_annotations": ...}


def test_file(rule_file: Path, interval_s: int, series: list[Series], expected: list[Expected]) -> dict:
    return {
        "rule_files": [str(rule_file)],
        "evaluation_interval": f"{interval_s}s",
        "tests": [{
            "interval": f"{interval_s}s",
            "input_series": [
                {"series": series_text(s.name, s.labels), "values": " ".join(value_text(v) for v in s.values)}
                for s in series
            ],
            "alert_rule_test": [
                {"eval_time": f"{e.eval_time}s", "alertname": e.alertname, "exp_alerts": e.alerts} for e in expected
            ],
        }],
    }


def run_promtool(tmp: Path, ruleset: RuleSet, series: list[Series], expected: list[Expected], interval_s: int) -> subprocess.CompletedProcess:
    rule_file = tmp / "rules.yml"
    rule_file.write_text(export_text(ruleset))
    test = tmp / "test.yml"
    test.write_text(yaml.safe_dump(test_file(rule_file, interval_s, series, expected), sort_keys=False, width=100000))
    return subprocess.run([require("promtool"), "test", "rules", str(test)], capture_output=True, text=True, timeout=120)


def in_process_alerts(ruleset: RuleSet, series: list[Series], interval_s: int, steps: int) -> list[Expected]:
    """Firing alerts per rule at every evaluation time, from gradwatch's own evaluator."""
    engine = RuleEngine(ruleset)
    out = []
    for i in range(steps):
        now = i * interval_s
        # the in-process store has no staleness markers: one is no sample here
        engine.add([(s.name, s.labels, s.values[i]) for s in series if i < len(s.values) and s.values[i] not in (None, STALE)], now)
        engine.evaluate(now)
        assert not engine.errors, engine.errors
        for rule in engine.rules:
            firing = [a for a in engine.tracker.alerts.values() if a.rule == rule.name and a.state == FIRING]
            out.append(Expected(now, rule.alert, [
                {"exp_labels": {k: v for k, v in a.labels.items() if k != "alertname"}, "exp_annotations": a.annotations}
                for a in sorted(firing, key=lambda a: sorted(a.labels.items()))
            ]))
    return out
