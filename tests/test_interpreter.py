"""The interpreter's pieces the liveness rules added (`time()`, `rate` with offsets, counter resets
and partial windows, `for_each`) and the `humanizeDuration` template, each held to promtool's own
answer on the same series: `promql_expr_test` for values, an alert's annotation for the template."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import yaml

from gradwatch.aggregator.evaluate import SeriesStore, evaluate
from gradwatch.aggregator.rules.promql import Aggregate, Expr, Time, binary, for_each, metric, over_time, render
from gradwatch.aggregator.rules.templates import render as render_template
from promtool_cases import Series, require, series_text, value_text

STEP = 10  # seconds between samples


def store_of(series: list[Series]) -> SeriesStore:
    store = SeriesStore(retention_s=10**6)
    for s in series:
        for i, v in enumerate(s.values):
            if v is not None:
                store.add(s.name, s.labels, i * STEP * 1000, v)
    return store


def run_tests(tmp: Path, series: list[Series], tests: dict, rules: dict | None = None) -> subprocess.CompletedProcess:
    rule_files = []
    if rules is not None:
        (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        rule_files = [str(tmp / "rules.yml")]
    test = {"rule_files": rule_files, "evaluation_interval": f"{STEP}s", "tests": [{
        "interval": f"{STEP}s",
        "input_series": [{"series": series_text(s.name, s.labels), "values": " ".join(value_text(v) for v in s.values)} for s in series],
        **tests,
    }]}
    (tmp / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False, width=100000))
    return subprocess.run([require("promtool"), "test", "rules", str(tmp / "test.yml")], capture_output=True, text=True, timeout=120)


def expr_tests(series: list[Series], exprs: list[Expr], times: list[int]) -> list[dict]:
    """One promql_expr_test per expression and time, expecting exactly what the interpreter says."""
    store = store_of(series)
    out = []
    for expr in exprs:
        for t in times:
            samples = evaluate(expr, store, t * 1000)
            assert all(math.isfinite(s.value) for s in samples)  # promtool compares values exactly: NaN never equals
            out.append({"expr": render(expr), "eval_time": f"{t}s", "exp_samples": [
                {"labels": series_text(dict(s.labels).get("__name__", ""), {k: v for k, v in s.labels if k != "__name__"}), "value": s.value}
                for s in samples
            ]})
    return out


COUNTER = [0, 4, 9, None, 20, 26, 3, 8, 15, None, None, 40, 47, 55]  # a reset at 60 s, gaps


def test_time_rate_and_offsets_match_promtool(tmp_path: Path):
    series = [
        Series("c_total", {"job": "a"}, [float(v) if v is not None else None for v in COUNTER]),
        Series("c_total", {"job": "b"}, [None] * 5 + [100.0, 130.0, 160.0, 161.0, 170.0, 170.0, 171.0, 200.0, 230.0]),
        Series("ts_seconds", {"job": "a", "rank": "0"}, [5.0 * i for i in range(14)]),
    ]
    exprs = [
        binary("-", Time(), metric("ts_seconds")),
        over_time("rate", "c_total", 30),
        over_time("rate", "c_total", 60, offset_s=20),
        binary("/", Aggregate("max", over_time("rate", "c_total", 20), ("job",)),
               Aggregate("max", over_time("rate", "c_total", 60, offset_s=20), ("job",)), on=("job",)),
    ]
    proc = run_tests(tmp_path, series, {"promql_expr_test": expr_tests(series, exprs, list(range(0, 140, 5)))})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_for_each_repeats_a_job_value_per_rank_like_promtool(tmp_path: Path):
    position = binary("+", metric("last_step"), binary("/", metric("phase"), 4))
    behind = binary("==", position, Aggregate("min", position, ("job",)), on=("job",), group_left=())
    series = [Series("stall", {"job": "j"}, [7.0] * 4), Series("stall", {"job": "k"}, [3.0] * 4)]
    for job, steps, phases in (("j", [10, 10, 9], [2, 1, 3]), ("k", [5, 5, 5], [0, 0, 0])):
        for r, (step, phase) in enumerate(zip(steps, phases)):
            series += [Series("last_step", {"job": job, "rank": str(r)}, [float(step)] * 4),
                       Series("phase", {"job": job, "rank": str(r)}, [float(phase)] * 4)]
    store = store_of(series)
    named = evaluate(for_each(metric("stall"), behind, ("rank",)), store, 0)
    assert sorted((s.get("job"), s.get("rank"), s.value) for s in named) == [("j", "2", 7.0), ("k", "0", 3.0), ("k", "1", 3.0), ("k", "2", 3.0)]
    proc = run_tests(tmp_path, series, {"promql_expr_test": expr_tests(series, [for_each(metric("stall"), behind, ("rank",))], [0, 20])})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


DURATIONS = [0.0, 0.5, 0.000123, 1.0, 9.87654, 59.99, 61.5, 615.0, 3600.0, 90061.0, 200000.5, -75.0, -0.25, math.inf, math.nan]


def test_humanize_duration_matches_prometheus(tmp_path: Path):
    template = "{{ $value | humanizeDuration }}"
    series = [Series("d", {"job": "j", "i": str(i)}, [v]) for i, v in enumerate(DURATIONS)]
    rules = {"groups": [{"name": "t", "rules": [{"alert": "D", "expr": "d", "annotations": {"text": template}}]}]}
    alerts = [{"exp_labels": {"job": "j", "i": str(i)}, "exp_annotations": {"text": render_template(template, {}, v)}} for i, v in enumerate(DURATIONS)]
    assert [a["exp_annotations"]["text"] for a in alerts][:9] == ["0s", "500ms", "123us", "1s", "9.877s", "59.99s", "1m 1s", "10m 15s", "1h 0m 0s"]
    proc = run_tests(tmp_path, series, {"alert_rule_test": [{"eval_time": "0s", "alertname": "D", "exp_alerts": alerts}]}, rules)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_engine_keeps_each_metric_as_long_as_its_rules_read_it():
    """A 1h baseline keeps the step counter an hour, not every series the agent exports."""
    from gradwatch.aggregator.evaluate import RuleEngine
    from gradwatch.aggregator.rules import RuleSet

    engine = RuleEngine(RuleSet())
    for t in range(0, 2 * 3600, 60):
        engine.add([("gradwatch_steps_total", {"job": "j"}, float(t)), ("gradwatch_activation_std", {"job": "j", "layer": "a"}, 1.0)], t)
        engine.evaluate(t)
    kept = {name: min(ts for points in by_labels.values() for ts, _ in points) for name, by_labels in engine.store._series.items()}
    now_ms = (2 * 3600 - 60) * 1000
    assert now_ms - kept["gradwatch_steps_total"] >= (3600 + 600) * 1000  # throughput_drop: 1h baseline, 10m before now
    assert now_ms - kept["gradwatch_activation_std"] <= 6 * 60 * 1000  # read by no rule: the lookback only
