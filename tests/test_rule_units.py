"""`promtool test rules` for every built-in rule, with its default thresholds: a firing case and a
quiet case each, at the rule group's 15 s interval. Expected labels and values are written out by
hand; annotations are rendered from those with gradwatch's template renderer, which promtool then
checks byte for byte against Prometheus's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.aggregator.rules import RuleSet, compile_rules
from gradwatch.aggregator.rules.templates import render
from promtool_cases import STALE, Expected, Series, run_promtool

STEP = 15  # seconds per sample = the default evaluation interval
RULES = {r.name: r for r in compile_rules(RuleSet())}


def alert(rule: str, value: float, **labels: str) -> dict:
    r = RULES[rule]
    return {
        "exp_labels": {**labels, **r.labels},
        "exp_annotations": {k: render(v, labels, value) for k, v in r.annotations.items()},
    }


def minutes(m: float) -> int:
    return int(m * 60)


def flat(value: float, n: int) -> list[float]:
    return [value] * n


def nan_origin_series(n_before: int, n: int) -> Series:
    return Series("gradwatch_nan_origin_step", {"job": "j", "kind": "activation", "layer": "fc2", "rank": "1"}, [None] * n_before + [412.0] * (n - n_before))


def stall_series(phases: dict[int, int], stall_at: int, n: int, step_seconds: float = 1.5, lag: dict[int, int] = {}) -> list[Series]:
    """Ranks training in lockstep (one sample per 15 s, 10 steps per sample) until sample `stall_at`,
    then frozen at the phase given per rank, `lag` seconds of progress earlier than the latest."""
    out = []
    for r, phase in phases.items():
        frozen = STEP * stall_at - lag.get(r, 0)
        job = {"job": "j", "rank": str(r)}
        out += [
            Series("gradwatch_rank_last_step", job, [float(10 * min(i, stall_at)) for i in range(n)]),
            Series("gradwatch_rank_phase", job, [float(i % 4 if i < stall_at else phase) for i in range(n)]),
            Series("gradwatch_rank_progress_timestamp_seconds", job, [float(STEP * i if i < stall_at else frozen) for i in range(n)]),
            Series("gradwatch_rank_heartbeat_timestamp_seconds", job, [float(STEP * i) for i in range(n)]),
        ]
        if step_seconds:
            out.append(Series("gradwatch_rank_step_seconds", job, flat(step_seconds, n)))
    return out


def agent_series(gone_at: int, n: int, finished: bool = False) -> list[Series]:
    """Rank 0's target: scraped until sample `gone_at`, then down (up 0, its series marked stale)."""
    target = {"instance": "trainer-0:9400"}
    info = {"job": "j", "version": "0.1", "world_size": "2", "sharding": "ddp", **target}
    out = [
        Series("up", {"job": "gradwatch-agents", **target}, [1.0 if i < gone_at else 0.0 for i in range(n)]),
        Series("gradwatch_agent_info", info, flat(1, gone_at) + [STALE]),
    ]
    if finished:  # the agent's last scrape before it closed said so
        out.append(Series("gradwatch_training_finished", {"job": "j", **target}, [None] * (gone_at - 1) + [1.0, STALE]))
    return out


def steps_counter(per_sample: list[float]) -> Series:
    total, values = 0.0, []
    for inc in per_sample:
        values.append(total)
        total += inc
    return Series("gradwatch_steps_total", {"job": "j"}, values)


CASES = {
    # rule: (series, [(eval seconds, [expected alerts])])
    "nan_gradient/located": (
        [
            Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "0"}, flat(0, 10)),
            Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "1"}, flat(0, 4) + flat(3, 6)),
            Series("gradwatch_nonfinite_steps_total", {"job": "j"}, flat(0, 4) + [1, 2, 3, 4, 5, 6]),
            nan_origin_series(4, 10),
        ],
        [(45, []), (60, [alert("nan_gradient", 3, job="j", kind="activation", layer="fc2", rank="1")])],
    ),
    "nan_gradient/counter-only": (  # one bad step between scrapes, then clean: the counter still tells
        [
            Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "0"}, flat(0, 12)),
            Series("gradwatch_nonfinite_steps_total", {"job": "j"}, flat(0, 4) + flat(1, 8)),
        ],
        [(45, []), (60, [alert("nan_gradient", 1.25, job="j")]), (minutes(2.5), [])],
    ),
    "nan_gradient/quiet": (
        [Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "0"}, flat(0, 20)),
         Series("gradwatch_nonfinite_steps_total", {"job": "j"}, flat(0, 20))],
        [(t, []) for t in range(0, 20 * STEP, 60)],
    ),
    "exploding_gradient/adaptive": (  # 8 min at ~1, then 100 for 2 min: fires after `for: 1m`
        [
            Series("gradwatch_grad_norm", {"job": "j"}, flat(1, 32) + flat(100, 9)),
            Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc1"}, flat(0.6, 32) + flat(99, 9)),
            Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc2"}, flat(0.8, 32) + flat(14, 9)),
        ],
        [(minutes(8.5), []), (minutes(9), [alert("exploding_gradient", 99, job="j", layer="fc1"), alert("exploding_gradient", 14, job="j", layer="fc2")])],
    ),
    "exploding_gradient/cap": (  # above the absolute cap from the first step: no baseline, no layer stands out
        [Series("gradwatch_grad_norm", {"job": "j"}, flat(2e4, 6)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc1"}, flat(2e4, 6))],
        [(45, []), (60, [alert("exploding_gradient", 2e4, job="j")])],
    ),
    "exploding_gradient/quiet": (  # noisy but stable, and a slow 5x drift over 20 minutes
        [Series("gradwatch_grad_norm", {"job": "j"}, [1 + 0.5 * (i % 3) + i * 0.05 for i in range(80)]),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc1"}, flat(1, 80))],
        [(t, []) for t in range(0, 80 * STEP, 60)],
    ),
    "vanishing_gradient/floor": (
        [Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc0.weight"}, flat(1e-9, 30)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc9.weight"}, flat(1e-2, 30))],
        [(minutes(4.75), []), (minutes(5), [alert("vanishing_gradient", 1e-9, job="j", layer="fc0.weight")])],
    ),
    "vanishing_gradient/early-late": (
        [Series("gradwatch_grad_norm_early_late_ratio", {"job": "j"}, flat(1e-3, 30)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc0.weight"}, flat(2e-5, 30)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc9.weight"}, flat(2e-2, 30))],
        [(minutes(4.75), []), (minutes(5), [alert("vanishing_gradient", 2e-5, job="j", layer="fc0.weight")])],
    ),
    "vanishing_gradient/quiet": (  # healthy ratio; an unused layer (norm exactly 0) is not "vanishing"
        [Series("gradwatch_grad_norm_early_late_ratio", {"job": "j"}, flat(0.2, 30)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "unused.weight"}, flat(0, 30)),
         Series("gradwatch_layer_grad_norm", {"job": "j", "layer": "fc0.weight"}, flat(0.1, 30))],
        [(t, []) for t in range(0, 30 * STEP, 60)],
    ),
    "saturated_activation/firing": (
        [Series("gradwatch_activation_saturated_ratio", {"job": "j", "layer": "act3"}, flat(0.8, 30)),
         Series("gradwatch_activation_saturated_ratio", {"job": "j", "layer": "act1"}, flat(0.1, 30))],
        [(minutes(5), [alert("saturated_activation", 0.8, job="j", layer="act3")])],
    ),
    "saturated_activation/quiet": (
        [Series("gradwatch_activation_saturated_ratio", {"job": "j", "layer": "act3"}, flat(0.5, 30))],
        [(minutes(6), [])],
    ),
    "dead_units/firing": (
        [Series("gradwatch_activation_dead_ratio", {"job": "j", "layer": "relu2"}, flat(0.75, 30))],
        [(minutes(4.75), []), (minutes(5), [alert("dead_units", 0.75, job="j", layer="relu2")])],
    ),
    "dead_units/quiet": (
        [Series("gradwatch_activation_dead_ratio", {"job": "j", "layer": "relu2"}, flat(0.2, 30))],
        [(minutes(6), [])],
    ),
    "loss_not_decreasing/plateau": (  # flat loss: the 10m window is not 1% below the one before
        [Series("gradwatch_loss", {"job": "j"}, flat(0.7, 130))],
        [(minutes(19.75), []), (minutes(20), [alert("loss_not_decreasing", 0.7, job="j")])],
    ),
    "loss_not_decreasing/quiet": (  # a loss still falling 5% per 10 minutes
        [Series("gradwatch_loss", {"job": "j"}, [2.0 * 0.95 ** (i / 40) for i in range(130)])],
        [(t, []) for t in range(0, 130 * STEP, 300)],
    ),
    "loss_spike/firing": (
        [Series("gradwatch_loss", {"job": "j"}, flat(1.0, 60) + flat(3.0, 10))],
        [(minutes(15.75), []), (minutes(16), [alert("loss_spike", 3.0, job="j")])],
    ),
    "loss_spike/quiet": (
        [Series("gradwatch_loss", {"job": "j"}, flat(1.0, 60) + flat(1.8, 20))],
        [(t, []) for t in range(0, 80 * STEP, 60)],
    ),
    "weight_update_ratio/firing": (
        [Series("gradwatch_layer_update_ratio", {"job": "j", "layer": "tiny"}, flat(1e-10, 30)),
         Series("gradwatch_layer_update_ratio", {"job": "j", "layer": "huge"}, flat(20, 30)),
         Series("gradwatch_layer_update_ratio", {"job": "j", "layer": "ok"}, flat(1e-3, 30)),
         Series("gradwatch_layer_update_ratio", {"job": "j", "layer": "frozen"}, flat(0, 30))],
        [(minutes(5), [alert("weight_update_ratio", 20, job="j", layer="huge"), alert("weight_update_ratio", 1e-10, job="j", layer="tiny")])],
    ),
    "overfit/firing": (
        [Series("gradwatch_loss", {"job": "j"}, flat(1.0, 60)), Series("gradwatch_eval_loss", {"job": "j"}, flat(1.5, 60))],
        [(minutes(9.75), []), (minutes(10), [alert("overfit", 0.5, job="j")])],
    ),
    "overfit/quiet": (
        [Series("gradwatch_loss", {"job": "j"}, flat(1.0, 60)), Series("gradwatch_eval_loss", {"job": "j"}, flat(1.05, 60))],
        [(minutes(14), [])],
    ),
    "rank_outlier/nonfinite": (  # rank 1 has NaNs, rank 0 is clean
        [Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "0"}, flat(0, 20)),
         Series("gradwatch_rank_nonfinite", {"job": "j", "rank": "1"}, flat(2, 20))],
        [(minutes(1.75), []), (minutes(2), [alert("rank_outlier", 2, job="j", rank="1")])],
    ),
    "rank_outlier/loss": (
        [Series("gradwatch_rank_loss", {"job": "j", "rank": str(r)}, flat(v, 20)) for r, v in enumerate([1.0, 1.1, 5.0])],
        [(minutes(2), [alert("rank_outlier", 5.0, job="j", rank="2")])],
    ),
    "rank_outlier/quiet": (  # every rank non-finite (that's nan_gradient's page), losses close
        [Series("gradwatch_rank_nonfinite", {"job": "j", "rank": str(r)}, flat(1, 20)) for r in range(3)]
        + [Series("gradwatch_rank_loss", {"job": "j", "rank": str(r)}, flat(v, 20)) for r, v in enumerate([1.0, 1.3, 0.8])],
        [(t, []) for t in range(0, 20 * STEP, 60)],
    ),
    "training_stalled/one-rank-behind": (  # rank 2 still in forward; ranks 0, 1 wait in the all-reduce
        stall_series({0: 2, 1: 2, 2: 1}, stall_at=20, n=64, lag={2: 10}),
        [(minutes(15), []), (minutes(15.25), [alert("training_stalled", 615, job="j", rank="2")])],
    ),
    "training_stalled/slow-steps": (  # 45 s steps: stalled after 20 x 45 s = 15m, not 10m; nobody behind
        stall_series({0: 0, 1: 0, 2: 0}, stall_at=10, n=74, step_seconds=45),
        [(minutes(12.5), []), (minutes(17.5), []),
         (minutes(17.75), [alert("training_stalled", 915, job="j", rank=str(r)) for r in range(3)])],
    ),
    "training_stalled/no-step-time-yet": (  # stuck before the first measured step: min_seconds alone
        stall_series({0: 3, 1: 1}, stall_at=2, n=44, step_seconds=0),
        [(minutes(10.5), []), (minutes(10.75), [alert("training_stalled", 615, job="j", rank="1")])],
    ),
    "training_stalled/finished": (  # the process serves on after its last step, having said it is done
        stall_series({0: 0, 1: 0}, stall_at=4, n=64) + [Series("gradwatch_training_finished", {"job": "j"}, [None] * 4 + flat(1, 60))],
        [(t, []) for t in range(0, 64 * STEP, 60)],
    ),
    "training_stalled/quiet": (  # training on, rank 1 always a phase behind
        stall_series({0: 2, 1: 1}, stall_at=200, n=160),
        [(t, []) for t in range(0, 160 * STEP, 120)],
    ),
    "agent_down/crashed": (  # its target fails at 2m; the alert names the training job, not the scrape job
        agent_series(gone_at=8, n=20),
        [(minutes(2), []), (minutes(6.75), []), (minutes(7), [alert("agent_down", 1, job="j")]),
         (minutes(61.75), [alert("agent_down", 1, job="j")]), (minutes(62), [])],  # forgotten after `window`
    ),
    "agent_down/quiet": (  # still scraped; and a job that finished normally said so before it went
        [Series("gradwatch_agent_info", {"job": "other", "version": "0.1", "world_size": "1", "sharding": "none"}, flat(1, 40))]
        + agent_series(gone_at=8, n=40, finished=True),
        [(t, []) for t in range(0, 40 * STEP, 60)],
    ),
    "straggler/firing": (
        [Series("gradwatch_rank_step_seconds", {"job": "j", "rank": str(r)}, flat(v, 30)) for r, v in enumerate([1.0, 1.05, 0.95, 2.0])],
        [(minutes(4.75), []), (minutes(5), [alert("straggler", 2.0 / 1.025, job="j", rank="3")])],
    ),
    "straggler/quiet": (  # synchronous DDP: every rank's wall step time is the same, or nearly
        [Series("gradwatch_rank_step_seconds", {"job": "j", "rank": str(r)}, [1.0 + 0.2 * ((i + r) % 3) for i in range(30)]) for r in range(4)],
        [(t, []) for t in range(0, 30 * STEP, 60)],
    ),
    "throughput_drop/firing": (  # 10 steps per 15 s for 80m, then 4
        [steps_counter([10.0] * 320 + [4.0] * 90)],
        [(minutes(95), []), (minutes(100), [alert("throughput_drop", (160 / 600) / (2160 / 3600), job="j")])],
    ),
    "throughput_drop/quiet": (  # the first hour (a partial baseline) and a slow 20% drift
        [steps_counter([10.0 * (1 - 0.2 * i / 400) for i in range(400)])],
        [(t, []) for t in range(0, 400 * STEP, 300)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_with_promtool(case: str, tmp_path: Path):
    series, checks = CASES[case]
    rule = RULES[case.split("/")[0]]
    expected = [Expected(t, rule.alert, alerts) for t, alerts in checks]
    proc = run_promtool(tmp_path, RuleSet(), series, expected, STEP)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_rule_has_a_firing_and_a_quiet_case():
    for name in RULES:
        cases = [c for c in CASES if c.split("/")[0] == name]
        assert any(any(alerts for _, alerts in CASES[c][1]) for c in cases), f"{name}: no firing case"
        assert any(c.endswith("quiet") for c in cases) or name == "weight_update_ratio", f"{name}: no quiet case"
