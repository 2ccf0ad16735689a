"""The benchmarks run end to end at a tiny size, and what they count (not what they time) is right:
they are the evidence for the overhead and cardinality claims, so they must not rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_overhead_counts_syncs_and_collectives_per_step(tmp_path: Path) -> None:
    report = run("overhead.py", tmp_path, "--models", "mlp", "--wraps", "ddp", "--configs", "baseline", "control", "grad", "peer-loop",
                 "--rounds", "1", "--cycles", "2", "--steps", "2", "--warmup", "1")
    rows = {r["config"]: r for r in report["results"]}
    assert set(rows) == {"baseline", "control", "grad", "peer-loop"}
    assert all("failed" not in r and r["blocks"] == 2 and r["ratio"] > 0 and len(r["samples"]) == 2 for r in rows.values())
    assert rows["baseline"]["ratio"] == 1.0
    params = 26  # 13 Linear layers: AdamW reads one step count per tensor
    assert rows["baseline"]["scalar_reads_per_step"] == params
    assert rows["grad"]["scalar_reads_per_step"] == params  # the agent's one packet copy is not a scalar read
    # the hand-written loop: a norm per tensor and the loss every step, max-abs and weight norm per tensor on 1 step in 10
    assert rows["peer-loop"]["scalar_reads_per_step"] == pytest.approx(params + params + 1 + 2 * params / 10)
    assert rows["baseline"]["collectives_per_step"] >= 1  # DDP's own bucket all-reduces, seen by the dispatcher
    # DDP: one all-reduce per combination of steps (about combine_seconds of them, at most 16)
    assert 0 < rows["grad"]["extra_collectives_per_step"] <= 0.5
    assert rows["peer-loop"]["extra_collectives_per_step"] == 0
    duel = report["head_to_head"]
    assert [(d["model"], d["wrap"], d["agent"], d["peer"], d["blocks"]) for d in duel] == [("mlp", "ddp", "grad", "peer-loop", 2)]
    for name in ("wall_ms", "cpu_ms", "monitor_ms"):
        m = duel[0][name]
        assert m["low"] <= m["median"] <= m["high"] and m["verdict"] in ("less", "tie", "more")
    assert report["machine"]["ranks"] == 2 and "overhead.py" in report["command"]
    assert set(report["collective"]) == {"cpu_ms", "wall_ms"} and all(math.isfinite(v) for v in report["collective"].values())


def test_overhead_pairs_compiled_configurations_with_the_compiled_baseline(tmp_path: Path) -> None:
    report = run("overhead.py", tmp_path, "--models", "mlp", "--wraps", "ddp", "fsdp2", "--configs", "compiled", "compiled+act/10",
                 "--compile-backend", "aot_eager", "--rounds", "1", "--cycles", "2", "--steps", "2", "--warmup", "1")
    rows = {(r["wrap"], r["config"]): r for r in report["results"]}
    assert set(rows) == {(w, c) for w in ("ddp", "fsdp2") for c in ("baseline", "compiled-baseline", "compiled", "compiled+act/10")}
    ddp = {c: r for (w, c), r in rows.items() if w == "ddp"}
    assert all("failed" not in r and r["blocks"] == 2 for r in ddp.values())
    assert ddp["baseline"]["ratio"] == ddp["compiled-baseline"]["ratio"] == 1.0  # each its own baseline
    assert [ddp[c]["paired_with"] for c in ("compiled", "compiled+act/10")] == ["compiled-baseline"] * 2
    for config in ("compiled-baseline", "compiled", "compiled+act/10"):
        r = ddp[config]
        assert r["graphs"] == 1 and r["recompiles"] == 0, config  # activation sampling toggles nothing Dynamo guards
        assert r["graph_breaks"] == ddp["compiled-baseline"]["graph_breaks"], config  # DDP's own, none of the agent's
        assert r["scalar_reads_per_step"] == 26  # AdamW's, as eager
    assert 0 < ddp["compiled"]["extra_collectives_per_step"] <= 0.5
    assert all(rows[("fsdp2", c)]["failed"].startswith("not run") for c in ("compiled-baseline", "compiled", "compiled+act/10"))
    assert report["compile_backend"] == "aot_eager"


def overhead_module():
    spec = importlib.util.spec_from_file_location("overhead", BENCHMARKS / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_interval_is_the_order_statistics_of_the_sign_test() -> None:
    overhead = overhead_module()
    # n = 20: P(B <= 5) = 0.021 <= 0.025 < P(B <= 6) = 0.058, so the 6th and 15th smallest values
    values = [float(v) for v in (13, 2, 20, 7, 5, 16, 1, 9, 18, 11, 4, 15, 8, 19, 3, 12, 6, 17, 10, 14)]
    assert overhead.median_ci(values) == (10.5, 6.0, 15.0)
    assert overhead.median_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few for 95%: the whole range
    sample = lambda wall, cpu, monitor: (wall / 1000, cpu / 1000, monitor / 1000, 0.0)
    # the agent's blocks 1 ms/step below the peer's in every cycle: the interval excludes zero
    agent = [sample(40 + i, 80 + i, 1.0) for i in range(10)]
    peer = [sample(41 + i, 81 + i, 1.5 + 0.1 * i) for i in range(10)]
    duel = overhead.head_to_head(agent, peer)
    assert duel["blocks"] == 10 and duel["wall_ms"]["verdict"] == "less" and duel["cpu_ms"]["verdict"] == "less"
    assert duel["wall_ms"]["median"] == pytest.approx(-1.0) and duel["monitor_ms"]["high"] < 0
    assert overhead.head_to_head(peer, agent)["wall_ms"]["verdict"] == "more"
    mixed = overhead.head_to_head(agent, [sample(40 + i + (1 if i % 2 else -1), 80 + i, 1.0) for i in range(10)])
    assert mixed["wall_ms"]["verdict"] == "tie" and mixed["monitor_ms"]["verdict"] == "tie"


def test_scale_counts_series_and_the_aggregator_alerts_on_the_sick_jobs(tmp_path: Path) -> None:
    report = run("scale.py", tmp_path, "--jobs", "12", "--layers", "6", "--rounds", "2")
    assert report["series"] and all(r["series"] == r["formula"] for r in report["series"])
    assert {r["ranks"] for r in report["series"]} == {1, 8, 64, 1024}
    ev = report["evaluation"]
    assert ev["rule_failures"] == 0 and len(ev["rule_median_ms"]) >= 10
    assert ev["pathological_jobs"] == {"vanishing": ["job-0", "job-10"], "nan": ["job-1", "job-11"]}
    alerting = ev["alerting_jobs"]
    assert alerting["vanishing_gradient"] == ["job-0", "job-10"] and alerting["nan_gradient"] == ["job-1", "job-11"]
    assert alerting.get("rank_outlier") == ["job-1", "job-11"]  # rank 1 alone went non-finite
    healthy = {f"job-{j}" for j in range(12)} - {"job-0", "job-10", "job-1", "job-11"}
    assert not healthy & {job for jobs in alerting.values() for job in jobs}


def test_overhead_runs_the_two_dimensional_layouts_on_four_ranks(tmp_path: Path) -> None:
    """HSDP and FSDP2+TP (2 x 2 meshes): the agent adds no scalar read and one all-reduce per
    combination of steps, as on the 1-D layouts."""
    report = run("overhead.py", tmp_path, "--world", "4", "--models", "mlp", "--wraps", "hsdp", "fsdp2+tp",
                 "--configs", "baseline", "grad", "--rounds", "1", "--cycles", "1", "--steps", "2", "--warmup", "1")
    rows = {(r["wrap"], r["config"]): r for r in report["results"]}
    assert set(rows) == {(w, c) for w in ("hsdp", "fsdp2+tp") for c in ("baseline", "grad")}
    for wrap in ("hsdp", "fsdp2+tp"):
        assert "failed" not in rows[(wrap, "grad")], rows[(wrap, "grad")]
        assert rows[(wrap, "grad")]["scalar_reads_per_step"] == rows[(wrap, "baseline")]["scalar_reads_per_step"]
        assert 0 < rows[(wrap, "grad")]["extra_collectives_per_step"] <= 1
    assert report["machine"]["ranks"] == 4


def test_the_two_dimensional_layouts_need_four_ranks(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "overhead.py"), "--wraps", "hsdp"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "need --world 4" in proc.stderr
