"""Activations: which modules saturate (tanh/sigmoid) or die (ReLU), from the sampled steps."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from ..wire import metric_names as names
from .common import JOB, LAYER, dashboard, job_variable, latest, layer_variable, query, series, thresholds

UID = "gradwatch-activations"


def build() -> db.Dashboard:
    def q(metric: str) -> str:
        return f"{metric}{{{JOB}, {LAYER}}}"

    warn = thresholds("green", (0.5, "red"))  # the saturation and dead-unit rules' default threshold
    panels = [
        series("Saturated fraction", "Fraction of tanh/sigmoid inputs in the flat range (0 for other modules).",
               "percentunit", [query(q(names.ACTIVATION_SATURATED_RATIO), "{{layer}}")]),
        series("Dead-unit fraction", "Fraction of units that are zero for every sample of the global batch.",
               "percentunit", [query(q(names.ACTIVATION_DEAD_RATIO), "{{layer}}")]),
        latest("Saturated now", "Latest sampled step; red at the alert threshold (50%).", "percentunit",
               [query(q(names.ACTIVATION_SATURATED_RATIO), "{{layer}}")], limits=warn),
        latest("Dead now", "Latest sampled step; red at the alert threshold (50%).", "percentunit",
               [query(q(names.ACTIVATION_DEAD_RATIO), "{{layer}}")], limits=warn),
        series("Activation mean", "Mean of each module's output (all ranks and micro-batches).", "short",
               [query(q(names.ACTIVATION_MEAN), "{{layer}}")], w=8),
        series("Activation std", "A std collapsing towards 0 precedes dead or saturated units.", "short",
               [query(q(names.ACTIVATION_STD), "{{layer}}")], w=8),
        series("Largest |activation|", "Largest absolute output element.", "short",
               [query(q(names.ACTIVATION_MAX_ABS), "{{layer}}")], w=8, log=True),
        series("Non-finite activations", "NaN/inf output elements in the sampled step.", "none",
               [query(q(names.ACTIVATION_NONFINITE), "{{layer}}")], w=24, h=6, bars=True),
    ]
    return dashboard(UID, "gradwatch / Activations", "Saturation and dead units per module (sampled steps).",
                     [job_variable(), layer_variable(names.ACTIVATION_STD)], panels)
