"""Cardinality and scale: series per job against the documented formula, and the aggregator's
evaluation time for many jobs against a real Prometheus holding synthetic agent series.

    .venv/bin/python benchmarks/scale.py [--jobs 100] [--layers 200] [--json out.json]

1. Series: a real agent (one process) on MLPs of several depths, scraped through its exporter, and
   the exporter fed R-rank statistics for large R; each count is compared with
   5L + 6A + 7R + G + 25 (docs/metrics.md).
2. Evaluation: `promtool tsdb create-blocks-from openmetrics` loads `--jobs` jobs x `--layers`
   layers of agent series (15 s apart, 12 minutes; every 10th job's early layers vanish, the next
   one's rank 1 goes non-finite) into a TSDB; a real Prometheus serves it. Each compiled rule's query
   is timed, then the aggregator's own evaluation round (`Aggregator.evaluate_once`: queries, alert
   tracking, its SQLite state, the remediation policy), and the alerts it raised are checked against
   the jobs that were given a pathology. Exit 1 if a count or an alert is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn


def formula(L: int, A: int, R: int, G: int) -> int:
    return 5 * L + 6 * A + 7 * R + G + 25


def series_counts() -> list[dict]:
    from gradwatch.agent import HealthAgent
    from gradwatch.agent.exporter import AgentState, StatsCollector
    from gradwatch.agent.heartbeat import Beat
    from gradwatch.agent.stats import RankStats

    rows = []
    for depth in (4, 16, 64):
        model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(16, 16), nn.ReLU())])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        agent = HealthAgent(model, opt, job="scale", metrics_port=None, activation_every=1, update_ratio_every=1)
        for step in range(3):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward()
            agent.step(opt, loss=loss)
            opt.zero_grad()
        agent.observe_eval(1.0)
        agent.flush()
        stats = agent.last_stats
        base = [(s.name, tuple(sorted(s.labels.items()))) for f in StatsCollector(agent.state).collect() for s in f.samples]
        L, A, G = len(agent.layers), len(stats.activations.modules), len(opt.param_groups)
        agent.close()
        for R in (1, 8, 64, 1024):  # the exporter given R ranks' rows: only per-rank series change
            state = AgentState("scale", R, "ddp", "0")
            with agent.state.lock:
                state.latest_activations, state.latest_update, state.eval_loss = agent.state.latest_activations, agent.state.latest_update, 1.0
                state.latest_detail = agent.state.latest_detail  # max-abs and weight norms, from the last detail step
            stats.ranks = [RankStats(r, 1.0, False, 0, 0, 0.1) for r in range(R)]
            state.heartbeats = {r: Beat(2, 0, 1.0, 1.0) for r in range(R)}
            state.record(stats)
            n = sum(1 for f in StatsCollector(state).collect() for _ in f.samples)
            rows.append(dict(layers=L, activation_modules=A, ranks=R, param_groups=G, series=n, formula=formula(L, A, R, G)))
        assert base
    return rows


def pathology(job: int) -> str:
    """Every 10th job vanishes, the next one goes NaN on rank 1; the rest train normally."""
    return {0: "vanishing", 1: "nan"}.get(job % 10, "healthy")


def openmetrics(jobs: int, layers: int, samples: int, step_s: int, end: float) -> str:
    rng = random.Random(0)
    lines: list[str] = []
    times = [end - (samples - 1 - i) * step_s for i in range(samples)]

    def family(name: str, kind: str, series: list[tuple[str, Callable[[int], float]]]) -> None:
        lines.append(f"# TYPE {name} {kind}")
        suffix = "_total" if kind == "counter" else ""
        for labels, value in series:
            lines.extend(f"{name}{suffix}{{{labels}}} {value(i):.6g} {t:.3f}" for i, t in enumerate(times))

    def noisy(base: float) -> Callable[[int], float]:
        return lambda i: base * (1 + 0.1 * rng.random())

    def layer_norm(j: int, k: int) -> Callable[[int], float]:
        if pathology(j) == "vanishing" and k < layers // 2:
            return noisy(1e-9)  # the early half of the network gets nothing
        return noisy(10 ** rng.uniform(-3, 0))

    jl = [(j, f'job="job-{j}"') for j in range(jobs)]
    nan_from = samples - 3
    family("gradwatch_layer_grad_norm", "gauge", [(f'{lab},layer="l{k}.weight"', layer_norm(j, k)) for j, lab in jl for k in range(layers)])
    family("gradwatch_layer_update_ratio", "gauge", [(f'{lab},layer="l{k}.weight"', noisy(10 ** rng.uniform(-4, -2))) for j, lab in jl for k in range(layers)])
    family("gradwatch_grad_norm", "gauge", [(lab, noisy(1.0)) for j, lab in jl])
    family("gradwatch_grad_norm_early_late_ratio", "gauge", [(lab, noisy(1e-6 if pathology(j) == "vanishing" else 0.5)) for j, lab in jl])
    family("gradwatch_loss", "gauge", [(lab, lambda i: 2.0 - i / samples + 0.01 * rng.random()) for j, lab in jl])  # decreasing
    family("gradwatch_eval_loss", "gauge", [(lab, lambda i: 2.0 - i / samples) for j, lab in jl])
    family("gradwatch_rank_loss", "gauge", [(f'{lab},rank="{r}"', lambda i: 2.0 - i / samples) for j, lab in jl for r in range(2)])
    nan_rank = lambda j, r: (lambda i: float(pathology(j) == "nan" and r == 1 and i >= nan_from))
    family("gradwatch_rank_nonfinite", "gauge", [(f'{lab},rank="{r}"', nan_rank(j, r)) for j, lab in jl for r in range(2)])
    family("gradwatch_nonfinite_steps", "counter",
           [(lab, (lambda i: max(0, i - nan_from + 1)) if pathology(j) == "nan" else (lambda i: 0.0)) for j, lab in jl])
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def evaluation(jobs: int, layers: int, rounds: int) -> dict:
    from gradwatch.aggregator.rules import RuleSet, compile_rules
    from gradwatch.aggregator.service.app import build_aggregator
    from gradwatch.aggregator.service.clients import PrometheusClient
    from gradwatch.aggregator.service.command_store import CommandStore
    from gradwatch.aggregator.service.config import AggregatorSettings

    tmp = Path(tempfile.mkdtemp(prefix="gradwatch-scale-"))
    end = math.floor(time.time() / 15) * 15 - 60
    samples, step_s = 48, 15
    text = openmetrics(jobs, layers, samples, step_s, end)
    (tmp / "data.om").write_text(text)
    t0 = time.perf_counter()
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(tmp / "data.om"), str(tmp / "tsdb")],
                   check=True, capture_output=True)
    load_s = time.perf_counter() - t0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "prometheus.yml").write_text("global: {scrape_interval: 15s}\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=10y", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        client = PrometheusClient(f"http://127.0.0.1:{port}", timeout=60)
        rules = compile_rules(RuleSet())
        per_rule: dict[str, list[float]] = {r.name: [] for r in rules}
        for _ in range(rounds):
            for rule in rules:
                t = time.perf_counter()
                client.query(rule.promql, end)
                per_rule[rule.name].append(time.perf_counter() - t)
        # The aggregator itself: every rule queried, alerts tracked and persisted, the policy consulted.
        settings = AggregatorSettings(prometheus_url=f"http://127.0.0.1:{port}", alertmanager_url=None, state=tmp / "state.sqlite", timeout=60)
        commands = CommandStore(settings.state)
        aggregator = build_aggregator(settings, RuleSet(), commands)
        round_s = []
        try:
            for i in range(rounds):
                started = time.perf_counter()
                aggregator.evaluate_once(end + i)
                round_s.append(time.perf_counter() - started)
            failures = sum(int(s.value) for m in aggregator.metrics.registry.collect() for s in m.samples
                           if s.name == "gradwatch_aggregator_rule_evaluation_failures_total")
            alerts: dict[str, set[str]] = {}
            for alert in aggregator.active():
                alerts.setdefault(alert.rule, set()).add(alert.job)
        finally:
            aggregator.store.close()
            commands.close()
    finally:
        prom.terminate()
        prom.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    expected = {p: sorted(f"job-{j}" for j in range(jobs) if pathology(j) == p) for p in ("vanishing", "nan")}
    return dict(jobs=jobs, layers=layers, samples_per_series=samples, openmetrics_mb=round(len(text) / 1e6, 1), promtool_load_s=round(load_s, 1),
                round_median_s=statistics.median(round_s), rule_failures=failures,
                rule_median_ms={k: round(1000 * statistics.median(v), 2) for k, v in per_rule.items()},
                alerting_jobs={rule: sorted(j) for rule, j in sorted(alerts.items())}, pathological_jobs=expected)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--layers", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    counts = series_counts()
    print(f"{'layers':>6} {'modules':>7} {'ranks':>5} {'series':>7} {'formula':>7}")
    for r in counts:
        print(f"{r['layers']:6} {r['activation_modules']:7} {r['ranks']:5} {r['series']:7} {r['formula']:7}")
    ev = evaluation(args.jobs, args.layers, args.rounds)
    print(f"\n{ev['jobs']} jobs x {ev['layers']} layers ({ev['openmetrics_mb']} MB OpenMetrics, loaded by promtool in {ev['promtool_load_s']} s)")
    print(f"one aggregator round (every rule queried, alerts tracked and persisted, policy consulted): "
          f"{ev['round_median_s']:.2f} s (median of {args.rounds}); rule failures: {ev['rule_failures']}")
    for name, ms in ev["rule_median_ms"].items():
        print(f"  {name:22} {ms:8.1f} ms   alerting jobs: {len(ev['alerting_jobs'].get(name, []))}")
    found = {"vanishing": ev["alerting_jobs"].get("vanishing_gradient", []), "nan": ev["alerting_jobs"].get("nan_gradient", [])}
    right = found == ev["pathological_jobs"]
    print(f"alerts on exactly the jobs given vanishing and NaN gradients: {'yes' if right else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(series=counts, evaluation=ev, command=" ".join(["scale.py"] + (argv or sys.argv[1:]))), indent=1))
    return 0 if right and not ev["rule_failures"] and all(r["series"] == r["formula"] for r in counts) else 1

if __name__ == "__main__":
    sys.exit(main())
