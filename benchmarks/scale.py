"""Cardinality and scale: series per job against the documented formula, and the aggregator's
evaluation time for many jobs against a real Prometheus holding synthetic agent series.

    .venv/bin/python benchmarks/scale.py [--jobs 100] [--layers 200] [--json out.json]

1. Series: a real agent (one process) on MLPs of several depths, scraped through its exporter, and
   the exporter fed R-rank statistics for large R; each count is compared with
   5L + 6A + 3R + G + 20 (docs/metrics.md).
2. Evaluation: `promtool tsdb create-blocks-from openmetrics` loads `--jobs` jobs x `--layers`
   layers of agent series (15 s apart, 12 minutes) into a TSDB; a real Prometheus serves it, and
   every compiled rule is queried the way the aggregator does, timed per rule and per round.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def formula(L: int, A: int, R: int, G: int) -> int:
    return 5 * L + 6 * A + 3 * R + G + 20


def series_counts() -> list[dict]:
    from gradwatch.agent import HealthAgent
    from gradwatch.agent.exporter import AgentState, StatsCollector
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
            stats.ranks = [RankStats(r, 1.0, False, 0, 0, 0.1) for r in range(R)]
            state.record(stats)
            n = sum(1 for f in StatsCollector(state).collect() for _ in f.samples)
            rows.append(dict(layers=L, activation_modules=A, ranks=R, param_groups=G, series=n, formula=formula(L, A, R, G)))
        assert base
    return rows


def openmetrics(jobs: int, layers: int, samples: int, step_s: int, end: float) -> str:
    rng = random.Random(0)
    lines: list[str] = []

    def family(name: str, kind: str, series: list[tuple[str, float]]) -> None:
        lines.append(f"# TYPE {name} {kind}")
        for labels, base in series:
            for i in range(samples):
                t = end - (samples - 1 - i) * step_s
                value = base * (1 + 0.1 * rng.random()) if kind == "gauge" else base + i
                lines.append(f"{name}{{{labels}}} {value:.6g} {t:.3f}")

    jl = [f'job="job-{j}"' for j in range(jobs)]
    family("gradwatch_layer_grad_norm", "gauge", [(f'{j},layer="l{k}.weight"', 10 ** rng.uniform(-3, 0)) for j in jl for k in range(layers)])
    family("gradwatch_layer_update_ratio", "gauge", [(f'{j},layer="l{k}.weight"', 10 ** rng.uniform(-4, -2)) for j in jl for k in range(layers)])
    for name in ("gradwatch_grad_norm", "gradwatch_loss", "gradwatch_grad_norm_early_late_ratio", "gradwatch_eval_loss"):
        family(name, "gauge", [(j, 1.0) for j in jl])
    family("gradwatch_rank_nonfinite", "gauge", [(f'{j},rank="{r}"', 0.0) for j in jl for r in range(2)])
    family("gradwatch_rank_loss", "gauge", [(f'{j},rank="{r}"', 1.0) for j in jl for r in range(2)])
    lines.append("# TYPE gradwatch_nonfinite_steps counter")
    for j in jl:
        for i in range(samples):
            lines.append(f"gradwatch_nonfinite_steps_total{{{j}}} 0 {end - (samples - 1 - i) * step_s:.3f}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def evaluation(jobs: int, layers: int, rounds: int) -> dict:
    from gradwatch.aggregator.rules import RuleSet, compile_rules
    from gradwatch.aggregator.service.clients import PrometheusClient

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
        round_s = []
        for _ in range(rounds):
            started = time.perf_counter()
            for rule in rules:
                t = time.perf_counter()
                client.query(rule.promql, end)
                per_rule[rule.name].append(time.perf_counter() - t)
            round_s.append(time.perf_counter() - started)
        series = int(json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/tsdb", timeout=30).read())["data"]["headStats"]["numSeries"])
    finally:
        prom.terminate()
        prom.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(jobs=jobs, layers=layers, samples_per_series=samples, openmetrics_mb=round(len(text) / 1e6, 1), promtool_load_s=round(load_s, 1),
                head_series=series, round_median_s=sorted(round_s)[len(round_s) // 2],
                rule_median_ms={k: round(1000 * sorted(v)[len(v) // 2], 2) for k, v in per_rule.items()})


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
    print(f"\n{ev['jobs']} jobs x {ev['layers']} layers ({ev['openmetrics_mb']} MB OpenMetrics, loaded by promtool in {ev['promtool_load_s']} s): "
          f"one evaluation round of all rules takes {ev['round_median_s']:.2f} s (median of {args.rounds})")
    for name, ms in ev["rule_median_ms"].items():
        print(f"  {name:22} {ms:8.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(series=counts, evaluation=ev, command=" ".join(["scale.py"] + (argv or sys.argv[1:]))), indent=1))
    return 0 if all(r["series"] <= r["formula"] for r in counts) else 1


if __name__ == "__main__":
    sys.exit(main())
