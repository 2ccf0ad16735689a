"""`gradwatch demo`, run as a user runs it (the console script, a real torchrun job, the real stack):
each scenario raises what it should, the summary follows its schema, the plots are written, the
closed loop pages and fixes the exploding run, and nothing it started outlives it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwatch.demo.catalog import EXPECTED_ALERTS
from gradwatch.demo.summary import Summary
from promtool_cases import require

GRADWATCH = [sys.executable, "-m", "gradwatch.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def demo(tmp: Path, *args: str, env: dict | None = None, timeout: float = 240) -> tuple[subprocess.CompletedProcess, Summary]:
    run = subprocess.run([*GRADWATCH, "demo", "--out", str(tmp), "--summary", str(tmp / "summary.json"), *args],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert (tmp / "summary.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return run, Summary.model_validate_json((tmp / "summary.json").read_text())


def fired(summary: Summary) -> set[str]:
    return {a.alertname for a in summary.alerts if a.state == "firing"}


def survivors(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the demo's out directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmdline = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (Path("/proc") / pid / "status").read_text()
            except OSError:
                continue
            if marker in cmdline and "State:\tZ" not in status:
                found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.multiproc
def test_nan_on_one_rank_is_named_skipped_and_summarised(tmp_path: Path):
    run, summary = demo(tmp_path, "--scenario", "nan", "--stack", "embedded", "--steps", "30", "--seconds-per-step", "0.15")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert summary.stack == "embedded" and summary.steps == 30 and summary.world_size == 2 and not summary.interrupted
    nan = [a for a in summary.alerts if a.alertname == "GradwatchNanGradient" and a.state == "firing"]
    assert len(nan) == 1 and nan[0].step >= 20, summary.alerts
    assert {k: nan[0].labels[k] for k in ("rank", "kind", "layer")} == {"rank": "1", "kind": "activation", "layer": "3"}
    assert summary.nan_origin == {"step": 20, "kind": "activation", "layer": "3", "ranks": [1]}
    assert summary.guard.skipped_steps == [20]  # the guard kept the NaN out of the weights, on every rank
    assert summary.final_loss is not None and math.isfinite(summary.final_loss)
    # the embedded aggregator (reading rank 0 directly) answered the NaN: the policy halves the LR; no pages
    assert [(c.kind, c.value, c.outcome) for c in summary.commands] == [("scale_lr", 0.5, "applied")] and summary.pages == []
    assert summary.commands[0].step > 20
    for png in summary.plots:
        data = Path(png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png
    assert {Path(p).name for p in summary.plots} == {"loss_grad_norm.png", "layer_grad_norm_heatmap.png"}
    # the printed view: progress lines, the alert as it fired, and the summary table
    assert "step   10/30" in run.stdout and "alert firing: GradwatchNanGradient layer=3 rank=1" in run.stdout
    assert "first NaN" in run.stdout and "step 20, activation of layer 3, rank(s) [1]" in run.stdout
    raw = json.loads((tmp_path / "summary.json").read_text())  # plain JSON: no NaN tokens in the summary
    assert raw["schema_version"] == 1 and set(raw) == set(Summary.model_fields)


@pytest.mark.multiproc
@pytest.mark.parametrize("scenario", ["exploding", "vanishing", "dead-relu", "healthy"])
def test_each_scenario_raises_what_it_should_and_nothing_when_healthy(tmp_path: Path, scenario: str):
    run, summary = demo(tmp_path, "--scenario", scenario, "--stack", "embedded", "--steps", "35", "--seconds-per-step", "0.2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    expected = set(EXPECTED_ALERTS[scenario])
    if expected:
        assert expected <= fired(summary), summary.alerts
    else:
        assert fired(summary) == set(), summary.alerts
    assert summary.expected_alerts == list(EXPECTED_ALERTS[scenario])
    if scenario == "exploding":  # what `make demo` runs on a machine without Prometheus: the loop still closes
        # the policy's first answer is the clip; the LR cut follows only if exploding fires again after the
        # clip was applied, which depends on where the scrapes fall - not asserted
        applied = [c for c in summary.commands if c.outcome == "applied"]
        assert applied and applied[0].kind == "set_clip_norm" and {c.kind for c in applied} <= {"set_clip_norm", "scale_lr"}, applied
        assert summary.nan_origin is None and summary.final_loss is not None and math.isfinite(summary.final_loss)
    if scenario == "vanishing":  # the early layers, not the late ones
        layers = {a.labels["layer"] for a in summary.alerts if a.alertname == "GradwatchVanishingGradient"}
        assert "0.0.weight" in layers and "29.0.weight" not in layers, layers


@pytest.mark.multiproc
def test_full_stack_pages_a_human_and_the_loop_fixes_the_exploding_run(tmp_path: Path):
    """The exploding scenario on the full stack: Prometheus scrapes rank 0, the aggregator fires, Alertmanager pages
    (critical -> the pager receiver), the policy clips on every rank (and halves the LR if exploding
    fires again after the clip), and the run ends finite."""
    require("prometheus")
    run, summary = demo(tmp_path, "--scenario", "exploding", "--stack", "full", "--steps", "50")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert summary.stack == "full" and "GradwatchExplodingGradient" in fired(summary)
    paged = {(p.receiver, p.alertname) for p in summary.pages if p.status == "firing"}
    assert ("training-pager", "GradwatchExplodingGradient") in paged, summary.pages
    kinds = [c.kind for c in summary.commands if c.outcome == "applied"]
    assert kinds and kinds[0] == "set_clip_norm" and set(kinds) <= {"set_clip_norm", "scale_lr"}, summary.commands
    first_alert = min(a.step for a in summary.alerts if a.alertname == "GradwatchExplodingGradient")
    assert all(c.step >= first_alert for c in summary.commands)  # the command answered the alert
    assert summary.nan_origin is None and summary.final_loss is not None and math.isfinite(summary.final_loss)


def test_without_prometheus_it_says_so_once_and_runs_embedded(tmp_path: Path):
    bare = {"PATH": str(Path(sys.executable).parent)}  # python and torchrun, no prometheus
    run, summary = demo(tmp_path, "--scenario", "healthy", "--steps", "3", "--seconds-per-step", "0", env=bare)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert summary.stack == "embedded" and summary.steps == 3
    out = " ".join(run.stdout.split())  # rich wraps at the terminal width
    assert out.count("Prometheus/Alertmanager not found") == 1
    assert "apt-get install -y prometheus prometheus-alertmanager" in out
    refused = subprocess.run([*GRADWATCH, "demo", "--stack", "full", "--out", str(tmp_path / "full")],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **bare})
    assert refused.returncode == 2 and "apt-get install -y prometheus prometheus-alertmanager" in " ".join(refused.stdout.split())


@pytest.mark.multiproc
@pytest.mark.parametrize("stack,sig", [("full", signal.SIGINT), ("embedded", signal.SIGTERM)])
def test_stopping_the_demo_leaves_no_process_behind(tmp_path: Path, stack: str, sig: signal.Signals):
    if stack == "full":
        require("prometheus")
    out = tmp_path / "demo-out"
    proc = subprocess.Popen([*GRADWATCH, "demo", "--scenario", "healthy", "--stack", stack, "--steps", "1000",
                             "--out", str(out), "--summary", str(out / "summary.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = out / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not events.exists() or events.read_text().count('"type": "step"') < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    children = survivors(str(out))
    assert len(children) >= (7 if stack == "full" else 5), children  # the demo, torchrun, 2 ranks, the servers
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-3000:]
    time.sleep(0.5)
    assert survivors(str(out)) == [], "left behind"
    summary = Summary.model_validate_json((out / "summary.json").read_text())
    assert summary.interrupted and 3 <= summary.steps < 1000


def test_live_view_renders_alerts_commands_and_pages_on_a_terminal():
    """The in-place panel (a terminal) and the line printer (a pipe) over the same run log."""
    import io

    from rich.console import Console

    from gradwatch.demo.live import View
    from gradwatch.demo.summary import PageRecord, RunLog

    log = RunLog("exploding", "j")
    log.add_event({"type": "start", "layers": ["fc1.weight"], "world_size": 2})
    for step in range(12):
        log.add_event({"type": "step", "step": step, "loss": float("inf") if step == 11 else 1.0, "grad_norm": 2.0,
                       "worst_layer": "fc1.weight", "clip_bound": 3.0, "skipped": step == 11, "clipped": step == 7})
    for layer in ("fc1.weight", "fc2.weight"):
        log.add_event({"type": "alert", "state": "firing", "labels": {"alertname": "GradwatchExplodingGradient", "layer": layer,
                       "severity": "critical"}, "step": 6, "time": 1.0})
    log.add_event({"type": "command", "step": 7, "kind": "set_clip_norm", "value": 1.5, "outcome": "applied"})
    log.pages = [PageRecord(receiver="training-pager", alertname="GradwatchExplodingGradient", status="firing", time=2.0)]
    for terminal in (True, False):
        out = io.StringIO()
        with View(log, 20, "test", Console(file=out, force_terminal=terminal, width=120, color_system=None)) as view:
            view.update()
        text = out.getvalue()
        assert "GradwatchExplodingGradient" in text and "on 2 layers: fc1.weight, fc2.weight" in text, text
        assert "set_clip_norm 1.5" in text and ("12/20" in text if terminal else "step   10/20" in text), text
        assert "live view failed" not in text
        if terminal:
            assert "1 steps skipped, 1 clipped" in text and "pages delivered   1" in text, text
        else:
            assert "page delivered to training-pager" in text


def test_a_server_that_fails_to_start_is_a_clear_error_and_leaves_nothing(tmp_path: Path):
    """A broken Prometheus on PATH: the demo says which server failed and its log (exit 2, no traceback)
    and stops what it had started."""
    require("prometheus-alertmanager")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prometheus").write_text("#!/bin/sh\necho 'err: cannot open storage' >&2\nexit 1\n")
    (bin_dir / "prometheus").chmod(0o755)
    (bin_dir / "prometheus-alertmanager").symlink_to(require("prometheus-alertmanager"))
    out = tmp_path / "demo-out"
    run = subprocess.run([*GRADWATCH, "demo", "--stack", "full", "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}"})
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    text = " ".join(run.stdout.split())
    assert "the stack did not start: prometheus exited with code 1" in text and "Traceback" not in run.stdout + run.stderr
    time.sleep(0.5)
    assert survivors(str(out)) == []  # Alertmanager, started first, was stopped


def test_without_the_demo_extra_it_names_the_extra_to_install(tmp_path: Path):
    """The `gradwatch` command line builds the demo's parser without rich or matplotlib; running the demo
    without them is one line naming the extra, not a traceback."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'rich': raise ImportError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from gradwatch.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "gradwatch: rich is not installed: pip install 'gradwatch[demo]'\n"
