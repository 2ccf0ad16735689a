"""Rule specs -> alerting rules over the agent's real metric names (docs/metrics.md).

Every expression keeps the `job` label and, where the pathology has one, `layer` or `rank`, so a page
says where to look. Annotation templates use only what `templates.py` renders exactly like
Prometheus (`$labels.x`, `humanize $value`, `if`): the conformance test compares both, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...wire import metric_names as names
from . import specs
from .promql import Aggregate, Expr, Time, binary, by_job, duration, for_each, metric, over_time, render, with_labels_of
from .templates import check as check_template

JOB = ("job",)
NOT_BIAS = (("layer", "!~", ".*[.]bias"),)  # biases feeding a norm layer have ~0 gradient by design


@dataclass(frozen=True)
class CompiledRule:
    name: str  # the spec's key, e.g. "nan_gradient"
    alert: str  # Prometheus alert name, e.g. "GradwatchNanGradient"
    expr: Expr
    for_s: int
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    needs_prometheus: str = ""  # why only Prometheus can evaluate it (in-process evaluators skip it)

    @property
    def promql(self) -> str:
        return render(self.expr)


def alert_name(rule: str) -> str:
    return "Gradwatch" + "".join(part.capitalize() for part in rule.split("_"))


def _nan(s: specs.NanGradient) -> tuple[Expr, str, str]:
    recent = binary(">", Aggregate("max", over_time("max_over_time", names.RANK_NONFINITE, s.window), JOB), 0)
    counted = binary(">", over_time("increase", names.NONFINITE_STEPS_TOTAL, s.window), 0)
    trigger = binary("or", recent, counted, on=JOB)
    # The origin over the same window as the trigger: when a job stops, both fade together and the
    # alert keeps one identity instead of re-appearing without its location. Two origins in the
    # window (a run resumed and failed again): the latest one.
    origin = Aggregate("topk", over_time("max_over_time", names.NAN_ORIGIN_STEP, s.window), JOB, 1)
    located = with_labels_of(trigger, origin, ("kind", "layer", "rank"))
    return (
        binary("or", located, trigger, on=JOB),
        "Non-finite gradient or loss in {{ $labels.job }}",
        "NaN/inf values in {{ $labels.job }} within the last " + duration(s.window) + "."
        "{{ if $labels.layer }} First seen in the {{ $labels.kind }} of layer {{ $labels.layer }} on rank {{ $labels.rank }}.{{ end }}",
    )


def _above_own_median(name: str, ratio: float, window: int) -> Expr:
    """`name` above `ratio` x its own median over `window`, series by series (matching on all labels)."""
    return binary(">", metric(name), binary("*", over_time("quantile_over_time", name, window, param=0.5), ratio))


def _exploding(s: specs.ExplodingGradient) -> tuple[Expr, str, str]:
    """One alert per exploding layer while the global norm explodes, or one per job (no layer) when
    only the global norm does, e.g. above the cap from the first step. Labels must not change from
    one evaluation to the next (a new label set restarts `for`), so the layer is each layer's own
    condition, never "the currently largest layer"."""
    explodes = _above_own_median(names.GRAD_NORM, s.ratio, s.window)
    if s.cap is not None:
        explodes = binary("or", explodes, binary(">", metric(names.GRAD_NORM), s.cap))
    layers = binary("and", _above_own_median(names.LAYER_GRAD_NORM, s.ratio, s.window), explodes, on=JOB)
    return (
        binary("or", layers, explodes, on=JOB),
        "Exploding gradients in {{ $labels.job }}",
        "Gradient norm {{ $value | humanize }}{{ if $labels.layer }} at layer {{ $labels.layer }}{{ end }}: "
        + f"over {s.ratio:g}x its {duration(s.window)} median, and the global norm is over {s.ratio:g}x its median"
        + (f" or over the cap {s.cap:g}." if s.cap is not None else "."),
    )


def _vanishing(s: specs.VanishingGradient) -> tuple[Expr, str, str]:
    """Per layer: below the absolute floor, or below `early_late_floor` x the largest layer's norm
    while the early/late ratio says the loss is depth-structured (not one odd small tensor)."""
    layer_norm = metric(names.LAYER_GRAD_NORM)
    # exactly 0: no gradient reached it (unused); biases: see NOT_BIAS
    below_floor = binary(">", binary("<", metric(names.LAYER_GRAD_NORM, matchers=NOT_BIAS), s.floor), 0)
    largest = binary("*", Aggregate("max", layer_norm, JOB), s.early_late_floor)
    small_share = binary("<", binary(">", layer_norm, 0), largest, on=JOB, group_left=())
    depth_structured = binary("<", metric(names.GRAD_NORM_EARLY_LATE_RATIO), s.early_late_floor)
    return (
        binary("or", below_floor, binary("and", small_share, depth_structured, on=JOB)),
        "Vanishing gradients in {{ $labels.job }} at layer {{ $labels.layer }}",
        "Gradient norm at layer {{ $labels.layer }} of {{ $labels.job }} is {{ $value | humanize }}: "
        + f"below {s.floor:g}, or below {s.early_late_floor:g}x the largest layer's while the early layers' "
        + f"norm is below {s.early_late_floor:g}x the late layers'.",
    )


def _per_layer_ratio(name: str, summary: str, what: str):
    def build(s) -> tuple[Expr, str, str]:
        return (
            binary(">", metric(name), s.max_ratio),
            summary + " in {{ $labels.job }} at layer {{ $labels.layer }}",
            "{{ $value | humanizePercentage }} of layer {{ $labels.layer }}'s " + f"{what} (threshold {s.max_ratio:.0%}).",
        )
    return build


def _loss_not_decreasing(s: specs.LossNotDecreasing) -> tuple[Expr, str, str]:
    recent = by_job(over_time("avg_over_time", names.LOSS, s.window))
    before = binary("*", by_job(over_time("avg_over_time", names.LOSS, s.window, offset_s=s.window)), 1 - s.min_decrease)
    return (
        binary(">=", recent, before, on=JOB),
        "Loss not decreasing in {{ $labels.job }}",
        "Mean loss over the last " + duration(s.window) + ' is {{ printf "%.4g" $value }}, '
        f"less than {s.min_decrease:.0%} below the {duration(s.window)} before.",
    )


def _loss_spike(s: specs.LossSpike) -> tuple[Expr, str, str]:
    baseline = by_job(over_time("avg_over_time", names.LOSS, s.window, offset_s=s.baseline_offset))
    return (
        binary(">", by_job(metric(names.LOSS)), binary("*", baseline, s.factor), on=JOB),
        "Loss spike in {{ $labels.job }}",
        'Loss {{ printf "%.4g" $value }} is at least ' + f"{s.factor:g}x its mean over the preceding {duration(s.window)}.",
    )


def _update_ratio(s: specs.WeightUpdateRatio) -> tuple[Expr, str, str]:
    ratio = metric(names.LAYER_UPDATE_RATIO)
    too_small = binary(">", binary("<", metric(names.LAYER_UPDATE_RATIO, matchers=NOT_BIAS), s.low), 0)
    return (
        binary("or", too_small, binary(">", ratio, s.high)),
        "Weight update ratio out of range in {{ $labels.job }} at layer {{ $labels.layer }}",
        "||dw||/||w|| of layer {{ $labels.layer }} is {{ $value | humanize }}, " + f"outside [{s.low:g}, {s.high:g}].",
    )


def _overfit(s: specs.Overfit) -> tuple[Expr, str, str]:
    train = by_job(over_time("avg_over_time", names.LOSS, s.window))
    gap = binary("/", binary("-", by_job(metric(names.EVAL_LOSS)), train, on=JOB), train, on=JOB)
    return (
        binary(">", gap, s.max_gap),
        "Overfitting in {{ $labels.job }}",
        "Validation loss is {{ $value | humanizePercentage }} above the mean training loss over " + f"{duration(s.window)} (threshold {s.max_gap:.0%}).",
    )


def _rank_outlier(s: specs.RankOutlier) -> tuple[Expr, str, str]:
    bad = over_time("max_over_time", names.RANK_NONFINITE, s.window)
    some_clean = binary("==", Aggregate("min", bad, JOB), 0)
    lone_nonfinite = binary("and", binary(">", bad, 0), some_clean, on=JOB)
    loss = over_time("avg_over_time", names.RANK_LOSS, s.window)
    median = binary("*", Aggregate("quantile", loss, JOB, 0.5), s.loss_factor)
    high_loss = binary(">", loss, median, on=JOB, group_left=())
    return (
        binary("or", lone_nonfinite, high_loss),
        "Rank {{ $labels.rank }} of {{ $labels.job }} departs from the others",
        'Rank {{ $labels.rank }}: {{ printf "%.4g" $value }} (non-finite items while another rank is clean, '
        + f"or mean loss over {s.loss_factor:g}x the ranks' median over {duration(s.window)}).",
    )


def _training_stalled(s: specs.TrainingStalled) -> tuple[Expr, str, str]:
    """The stall clock is the age of the job's latest progress on any rank (a rank entering a phase
    or completing a step): within one step of the last completed step, and, unlike the latest
    measured step's timestamp, fresh on every step. The ranks named are those furthest behind."""
    stall = binary("-", Time(), Aggregate("max", metric(names.RANK_PROGRESS_TIMESTAMP), JOB))
    median = Aggregate("max", over_time("quantile_over_time", names.RANK_STEP_SECONDS, s.window, param=0.5), JOB)
    # max(min_seconds, factor x median) without a fallback series: no step time yet means min_seconds
    stalled = binary("unless", binary(">", stall, s.min_seconds), binary("<=", stall, binary("*", median, s.factor), on=JOB), on=JOB)
    stalled = binary("unless", stalled, binary(">", metric(names.TRAINING_FINISHED), 0), on=JOB)  # done, not stuck
    position = binary("+", metric(names.RANK_LAST_STEP), binary("/", metric(names.RANK_PHASE), 4))
    behind = binary("==", position, Aggregate("min", position, JOB), on=JOB, group_left=())
    return (
        for_each(stalled, behind, ("rank",)),
        "Training stalled in {{ $labels.job }}: rank {{ $labels.rank }} is furthest behind",
        "No rank of {{ $labels.job }} has made progress for {{ $value | humanizeDuration }} "
        f"(stalled after the longer of {duration(s.min_seconds)} and {s.factor:g}x the median step time over {duration(s.window)}). "
        "Rank {{ $labels.rank }} is at the lowest step and phase; every rank at that point is named.",
    )


def _agent_down(s: specs.AgentDown) -> tuple[Expr, str, str]:
    """A job seen within `window` whose `gradwatch_agent_info` is gone now. A failed scrape (`up ==
    0`) and a removed target both mark the target's series stale at once, so this is both cases, and
    it names the training job (`up` carries the scrape job's name, not the training job's)."""
    seen = by_job(over_time("max_over_time", names.AGENT_INFO, s.window))
    gone = binary("unless", seen, metric(names.AGENT_INFO), on=JOB)
    finished = binary(">", over_time("max_over_time", names.TRAINING_FINISHED, s.window), 0)
    return (
        binary("unless", gone, finished, on=JOB),
        "No metrics from {{ $labels.job }}",
        "Prometheus has not scraped the gradwatch agent of {{ $labels.job }} (rank 0) for at least "
        + f"{duration(s.for_)}: its target is down or gone. A job that finished normally does this too.",
    )


def _straggler(s: specs.Straggler) -> tuple[Expr, str, str]:
    mean = over_time("avg_over_time", names.RANK_STEP_SECONDS, s.window)
    ratio = binary("/", mean, Aggregate("quantile", mean, JOB, 0.5), on=JOB, group_left=())
    return (
        binary(">", ratio, s.factor),
        "Rank {{ $labels.rank }} of {{ $labels.job }} is a straggler",
        "Rank {{ $labels.rank }}'s mean step time over " + duration(s.window) + ' is {{ printf "%.4g" $value }}x '
        + f"the ranks' median (threshold {s.factor:g}x).",
    )


def _throughput_drop(s: specs.ThroughputDrop) -> tuple[Expr, str, str]:
    recent = by_job(over_time("rate", names.STEPS_TOTAL, s.window))
    before = by_job(over_time("rate", names.STEPS_TOTAL, s.baseline, offset_s=s.window))
    return (
        binary("<", binary("/", recent, before, on=JOB), s.min_fraction),
        "Step rate dropped in {{ $labels.job }}",
        "Steps per second of {{ $labels.job }} over the last " + duration(s.window) + " are {{ $value | humanizePercentage }} "
        + f"of the rate over the {duration(s.baseline)} before (threshold {s.min_fraction:.0%}).",
    )


BUILDERS = {
    "nan_gradient": _nan,
    "exploding_gradient": _exploding,
    "vanishing_gradient": _vanishing,
    "saturated_activation": _per_layer_ratio(names.ACTIVATION_SATURATED_RATIO, "Saturated activations", "tanh/sigmoid inputs are saturated"),
    "dead_units": _per_layer_ratio(names.ACTIVATION_DEAD_RATIO, "Dead units", "units are dead (zero for the whole batch)"),
    "loss_not_decreasing": _loss_not_decreasing,
    "loss_spike": _loss_spike,
    "weight_update_ratio": _update_ratio,
    "overfit": _overfit,
    "rank_outlier": _rank_outlier,
    "training_stalled": _training_stalled,
    "agent_down": _agent_down,
    "straggler": _straggler,
    "throughput_drop": _throughput_drop,
}

# Rules whose meaning rests on Prometheus's scrape bookkeeping, with the reason in-process
# evaluators give for skipping them.
NEEDS_PROMETHEUS = {
    "agent_down": "needs Prometheus's scrape targets: there a failed or removed target's series vanish at once "
                  "(staleness); in process they linger for the 5-minute lookback, and an agent cannot see its own absence",
}
assert BUILDERS.keys() == specs.RULE_TYPES.keys()


# Alert identity: these labels and nothing else. Aggregating by them drops target labels such as
# `instance` (a restarted rank 0 on another host is the same job) and merges duplicate scrapes.
ALERT_LABELS = ("job", "kind", "layer", "rank")


def compile_rule(name: str, spec: specs.RuleSpec) -> CompiledRule:
    expr, summary, description = BUILDERS[name](spec)
    for text in (summary, description, spec.runbook):
        check_template(text)
    return CompiledRule(
        name=name,
        alert=alert_name(name),
        expr=Aggregate("max", expr, ALERT_LABELS),
        for_s=spec.for_,
        labels={"severity": spec.severity, **spec.labels},
        annotations={"summary": summary, "description": description, "runbook": spec.runbook},
        needs_prometheus=NEEDS_PROMETHEUS.get(name, ""),
    )


def compile_rules(ruleset: specs.RuleSet) -> list[CompiledRule]:
    return [compile_rule(name, spec) for name, spec in ruleset.enabled()]
