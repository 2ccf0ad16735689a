"""Rule specs -> alerting rules over the agent's real metric names (docs/metrics.md).

Every expression keeps the `job` label and, where the pathology has one, `layer` or `rank`, so a page
says where to look. Annotation templates use only what `templates.py` renders exactly like
Prometheus (`$labels.x`, `humanize $value`, `if`): the conformance test compares both, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import specs
from .promql import Aggregate, Expr, binary, by_job, duration, metric, over_time, render, with_labels_of
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

    @property
    def promql(self) -> str:
        return render(self.expr)


def alert_name(rule: str) -> str:
    return "Gradwatch" + "".join(part.capitalize() for part in rule.split("_"))


def _nan(s: specs.NanGradient) -> tuple[Expr, str, str]:
    recent = binary(">", Aggregate("max", over_time("max_over_time", "gradwatch_rank_nonfinite", s.window), JOB), 0)
    counted = binary(">", over_time("increase", "gradwatch_nonfinite_steps_total", s.window), 0)
    trigger = binary("or", recent, counted, on=JOB)
    # The origin over the same window as the trigger: when a job stops, both fade together and the
    # alert keeps one identity instead of re-appearing without its location. Two origins in the
    # window (a run resumed and failed again): the latest one.
    origin = Aggregate("topk", over_time("max_over_time", "gradwatch_nan_origin_step", s.window), JOB, 1)
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
    explodes = _above_own_median("gradwatch_grad_norm", s.ratio, s.window)
    if s.cap is not None:
        explodes = binary("or", explodes, binary(">", metric("gradwatch_grad_norm"), s.cap))
    layers = binary("and", _above_own_median("gradwatch_layer_grad_norm", s.ratio, s.window), explodes, on=JOB)
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
    layer_norm = metric("gradwatch_layer_grad_norm")
    # exactly 0: no gradient reached it (unused); biases: see NOT_BIAS
    below_floor = binary(">", binary("<", metric("gradwatch_layer_grad_norm", matchers=NOT_BIAS), s.floor), 0)
    largest = binary("*", Aggregate("max", layer_norm, JOB), s.early_late_floor)
    small_share = binary("<", binary(">", layer_norm, 0), largest, on=JOB, group_left=())
    depth_structured = binary("<", metric("gradwatch_grad_norm_early_late_ratio"), s.early_late_floor)
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
    recent = by_job(over_time("avg_over_time", "gradwatch_loss", s.window))
    before = binary("*", by_job(over_time("avg_over_time", "gradwatch_loss", s.window, offset_s=s.window)), 1 - s.min_decrease)
    return (
        binary(">=", recent, before, on=JOB),
        "Loss not decreasing in {{ $labels.job }}",
        "Mean loss over the last " + duration(s.window) + ' is {{ printf "%.4g" $value }}, '
        f"less than {s.min_decrease:.0%} below the {duration(s.window)} before.",
    )


def _loss_spike(s: specs.LossSpike) -> tuple[Expr, str, str]:
    baseline = by_job(over_time("avg_over_time", "gradwatch_loss", s.window, offset_s=s.baseline_offset))
    return (
        binary(">", by_job(metric("gradwatch_loss")), binary("*", baseline, s.factor), on=JOB),
        "Loss spike in {{ $labels.job }}",
        'Loss {{ printf "%.4g" $value }} is at least ' + f"{s.factor:g}x its mean over the preceding {duration(s.window)}.",
    )


def _update_ratio(s: specs.WeightUpdateRatio) -> tuple[Expr, str, str]:
    ratio = metric("gradwatch_layer_update_ratio")
    too_small = binary(">", binary("<", metric("gradwatch_layer_update_ratio", matchers=NOT_BIAS), s.low), 0)
    return (
        binary("or", too_small, binary(">", ratio, s.high)),
        "Weight update ratio out of range in {{ $labels.job }} at layer {{ $labels.layer }}",
        "||dw||/||w|| of layer {{ $labels.layer }} is {{ $value | humanize }}, " + f"outside [{s.low:g}, {s.high:g}].",
    )


def _overfit(s: specs.Overfit) -> tuple[Expr, str, str]:
    train = by_job(over_time("avg_over_time", "gradwatch_loss", s.window))
    gap = binary("/", binary("-", by_job(metric("gradwatch_eval_loss")), train, on=JOB), train, on=JOB)
    return (
        binary(">", gap, s.max_gap),
        "Overfitting in {{ $labels.job }}",
        "Validation loss is {{ $value | humanizePercentage }} above the mean training loss over " + f"{duration(s.window)} (threshold {s.max_gap:.0%}).",
    )


def _rank_outlier(s: specs.RankOutlier) -> tuple[Expr, str, str]:
    bad = over_time("max_over_time", "gradwatch_rank_nonfinite", s.window)
    some_clean = binary("==", Aggregate("min", bad, JOB), 0)
    lone_nonfinite = binary("and", binary(">", bad, 0), some_clean, on=JOB)
    loss = over_time("avg_over_time", "gradwatch_rank_loss", s.window)
    median = binary("*", Aggregate("quantile", loss, JOB, 0.5), s.loss_factor)
    high_loss = binary(">", loss, median, on=JOB, group_left=())
    return (
        binary("or", lone_nonfinite, high_loss),
        "Rank {{ $labels.rank }} of {{ $labels.job }} departs from the others",
        'Rank {{ $labels.rank }}: {{ printf "%.4g" $value }} (non-finite items while another rank is clean, '
        + f"or mean loss over {s.loss_factor:g}x the ranks' median over {duration(s.window)}).",
    )


BUILDERS = {
    "nan_gradient": _nan,
    "exploding_gradient": _exploding,
    "vanishing_gradient": _vanishing,
    "saturated_activation": _per_layer_ratio("gradwatch_activation_saturated_ratio", "Saturated activations", "tanh/sigmoid inputs are saturated"),
    "dead_units": _per_layer_ratio("gradwatch_activation_dead_ratio", "Dead units", "units are dead (zero for the whole batch)"),
    "loss_not_decreasing": _loss_not_decreasing,
    "loss_spike": _loss_spike,
    "weight_update_ratio": _update_ratio,
    "overfit": _overfit,
    "rank_outlier": _rank_outlier,
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
    )


def compile_rules(ruleset: specs.RuleSet) -> list[CompiledRule]:
    return [compile_rule(name, spec) for name, spec in ruleset.enabled()]
