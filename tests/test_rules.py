"""Rule specs: YAML overrides, clear errors for bad files, the exported rule file (promtool-valid,
committed without drift), the deploy configs, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.aggregator.rules import RuleFileError, RuleSet, compile_rules, export_text, load_rules, parse_rules
from gradwatch.aggregator.rules.templates import TemplateError, check, humanize, render
from promtool_cases import require

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "deploy" / "prometheus" / "rules" / "gradwatch.rules.yml"
GRADWATCH = [sys.executable, "-m", "gradwatch.cli"]


def test_every_pathology_has_a_rule_naming_job_and_a_runbook():
    rules = compile_rules(RuleSet())
    assert [r.name for r in rules] == [
        "nan_gradient", "exploding_gradient", "vanishing_gradient", "saturated_activation", "dead_units",
        "loss_not_decreasing", "loss_spike", "weight_update_ratio", "overfit", "rank_outlier",
        "training_stalled", "agent_down", "straggler", "throughput_drop",
    ]
    for r in rules:
        assert r.alert.startswith("Gradwatch") and r.labels["severity"] in ("critical", "warning", "info")
        assert "$labels.job" in r.annotations["summary"] + r.annotations["description"]
        assert len(r.annotations["runbook"]) > 80
        for text in r.annotations.values():
            check(text)  # only what we render exactly like Prometheus
    by_name = {r.name: r for r in rules}
    assert "ReLU" in by_name["vanishing_gradient"].annotations["runbook"] and "skip" in by_name["vanishing_gradient"].annotations["runbook"]
    assert "standardize" in by_name["exploding_gradient"].annotations["runbook"] and "Clip" in by_name["exploding_gradient"].annotations["runbook"]
    assert "layer" in by_name["vanishing_gradient"].annotations["description"]
    assert "rank" in by_name["rank_outlier"].annotations["summary"]
    assert "rank" in by_name["training_stalled"].annotations["summary"] and "rank" in by_name["straggler"].annotations["summary"]
    assert "If every rank is named, no rank is behind" in by_name["training_stalled"].annotations["runbook"]
    assert "finished normally" in by_name["agent_down"].annotations["runbook"]
    assert [r.name for r in rules if r.needs_prometheus] == ["agent_down"]


def test_liveness_thresholds_are_spec_fields():
    rs = parse_rules("rules:\n  training_stalled: {min_seconds: 20s, factor: 5, window: 2m}\n  throughput_drop: {min_fraction: 0.25, baseline: 2h}\n")
    by_name = {r.name: r for r in compile_rules(rs)}
    stalled = by_name["training_stalled"].promql
    assert "> 20)" in stalled and "* 5)" in stalled and "gradwatch_rank_step_seconds[2m]" in stalled
    assert "time() - max by (job) (gradwatch_rank_progress_timestamp_seconds)" in stalled
    assert "< 0.25" in by_name["throughput_drop"].promql and "[2h] offset 10m" in by_name["throughput_drop"].promql
    with pytest.raises(RuleFileError, match="factor: Input should be greater than 1"):
        parse_rules("rules:\n  straggler: {factor: 0.5}\n")


def test_yaml_overrides_only_what_it_names():
    rs = parse_rules("interval: 30s\nrules:\n  exploding_gradient:\n    ratio: 20\n    for: 2m\n  loss_spike:\n    enabled: false\n")
    default = RuleSet()
    assert rs.interval == 30
    assert rs.rules.exploding_gradient.ratio == 20 and rs.rules.exploding_gradient.for_ == 120
    assert rs.rules.exploding_gradient.cap == default.rules.exploding_gradient.cap
    assert rs.rules.vanishing_gradient == default.rules.vanishing_gradient
    names = [r.name for r in compile_rules(rs)]
    assert "loss_spike" not in names and len(names) == 13
    assert "20" in {r.name: r for r in compile_rules(rs)}["exploding_gradient"].promql


@pytest.mark.parametrize("text, line, reason", [
    ("rules:\n  exploding_gradient:\n    ratio: 20\n    ratoi: 3\n", 4, "rules.exploding_gradient.ratoi: Extra inputs are not permitted"),
    ("rules:\n  vanishing_gradient:\n    floor: -1\n", 3, "rules.vanishing_gradient.floor: Input should be greater than 0"),
    ("interval: 15s\nrules:\n  nan_gradient:\n    for: soon\n", 4, "'soon' is not a duration"),
    ("rules:\n  exploding:\n    ratio: 2\n", 2, "rules.exploding: Extra inputs are not permitted"),
    ("rules:\n  weight_update_ratio: {low: 5, high: 1}\n", 2, "low (5.0) must be below high (1.0)"),
    ("rules:\n  loss_spike:\n    factor: [2\n", 4, "not valid YAML"),
    ("- just\n- a list\n", 1, "expected a mapping"),
])
def test_bad_rule_file_names_file_line_and_reason(tmp_path, text, line, reason):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RuleFileError) as err:
        load_rules(path)
    assert f"{path}:{line}:" in str(err.value)
    assert reason in str(err.value)


def test_cli_rejects_a_bad_rule_file_at_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  dead_units:\n    max_ratio: 2\n")
    for argv in (["rules", "check", str(bad)], ["aggregator", "--rules", str(bad), "--state", str(tmp_path / "s.db")]):
        proc = subprocess.run(GRADWATCH + argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"{bad}:3: rules.dead_units.max_ratio: Input should be less than 1" in proc.stderr


def test_cli_export_passes_promtool_check(tmp_path):
    out = tmp_path / "rules.yml"
    subprocess.run(GRADWATCH + ["rules", "export", "-o", str(out)], check=True, timeout=60)
    proc = subprocess.run([require("promtool"), "check", "rules", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 14 rules found" in proc.stdout


def test_committed_rule_file_has_not_drifted():
    assert COMMITTED.read_text() == export_text(RuleSet()), (
        "deploy/prometheus/rules/gradwatch.rules.yml is stale: run "
        "`gradwatch rules export -o deploy/prometheus/rules/gradwatch.rules.yml`"
    )


def test_deploy_configs_are_valid():
    prom = subprocess.run([require("promtool"), "check", "config", "prometheus.yml"], cwd=REPO / "deploy" / "prometheus", capture_output=True, text=True)
    assert prom.returncode == 0, prom.stdout + prom.stderr
    assert "SUCCESS: 14 rules found" in prom.stdout  # the rule file it loads is the committed one
    am = subprocess.run([require("amtool"), "check-config", "alertmanager.yml"], cwd=REPO / "deploy" / "alertmanager", capture_output=True, text=True)
    assert am.returncode == 0, am.stdout + am.stderr


@pytest.mark.parametrize("value, text", [
    (0, "0"), (1, "1"), (1234.5, "1.234k"), (2.5e7, "25M"), (1e-9, "1n"), (0.000123, "123u"),
    (float("nan"), "NaN"), (float("inf"), "+Inf"), (-0.5, "-500m"), (999.95, "1000"),
])
def test_humanize_matches_prometheus(value, text):
    assert humanize(value) == text


def test_templates_render_labels_conditionals_and_reject_the_unknown():
    t = "x{{ if $labels.layer }} at {{ $labels.layer }}{{ end }}: {{ $value | humanizePercentage }}"
    assert render(t, {"layer": "fc1"}, 0.75) == "x at fc1: 75%"
    assert render(t, {}, 0.5) == "x: 50%"
    for bad in ("{{ $value }}", "{{ .Labels.job }}", "{{ if $labels.a }}{{ if $labels.b }}{{ end }}{{ end }}", "{{ if $labels.a }}"):
        with pytest.raises(TemplateError):
            check(bad)


@pytest.mark.parametrize("text, reason", [
    ("rules:\n  nan_gradient:\n    runbook: 'see {{ $value }}'\n", "unsupported template action"),
    ("rules:\n  nan_gradient:\n    labels: {team-name: ml}\n", "not a usable label name"),
    ("rules:\n  nan_gradient:\n    labels: {alertname: x}\n", "not a usable label name"),
])
def test_user_text_that_would_not_render_like_prometheus_is_rejected(text, reason):
    with pytest.raises(RuleFileError) as err:
        parse_rules(text, "r.yaml")
    assert "r.yaml:3:" in str(err.value) and reason in str(err.value)
