"""Layers: where in the network gradients explode or vanish, and how fast each layer's weights move."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap
from grafana_foundation_sdk.models import heatmap as hm

from ..wire import metric_names as names
from .common import JOB, LAYER, dashboard, job_variable, latest, layer_variable, panel, query, series, thresholds

UID = "gradwatch-layers"

# The heatmap's rows follow the order of the query's series (Grafana sorts them only when every name is
# a number), and Prometheus returns a range query's series sorted by label set, so `layers.10` lands
# before `layers.2`. Grafana 11.6 has no natural-sort option or transformation for this, and there is no
# layer-index label; instead the query adds a label that sorts first (upper case precedes `__name__`)
# holding the layer name with its first number zero-padded to 3 digits: natural order up to 999 layers.
ORDER_LABEL = "LayerOrder"


def natural_order(expr: str) -> str:
    """`expr` with ORDER_LABEL = its `layer` label, first number padded: layers.2.w -> layers.002.w."""
    keyed = f'label_replace({expr}, "{ORDER_LABEL}", "$1", "layer", "(.*)")'
    for zeros, digits in (("00", "[0-9]"), ("0", "[0-9][0-9]")):  # a 1-digit, then a 2-digit first number
        keyed = (f'label_replace({keyed}, "{ORDER_LABEL}", "${{1}}{zeros}$2", "{ORDER_LABEL}", '
                 f'"([^0-9]*)({digits}([^0-9].*)?)")')
    return keyed


def build() -> db.Dashboard:
    grad = f"{names.LAYER_GRAD_NORM}{{{JOB}, {LAYER}}}"
    # One row per layer in network order, the first at the top, coloured by norm; exponential colour
    # so a 1e3x spike does not hide the rest.
    grad_heatmap = (
        heatmap.Panel().calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Spectral")
               .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.3).steps(64))
        .y_axis(heatmap.YAxisConfig().unit("none").reverse(True)).cell_values(heatmap.CellValues().unit("short"))
        .show_legend()
    )
    panels = [
        panel(grad_heatmap, "Gradient norm per layer", "L2 norm of each layer's gradient (before clipping) over time; "
              "rows in natural order of the layer names (layers.2 before layers.10), the first at the top.",
              "short", [query(natural_order(grad), "{{layer}}")], w=24, h=10),
        series("Gradient norm", "Per layer, log scale.", "short", [query(grad, "{{layer}}")], log=True),
        latest("Vanishing layers: gradient norm / largest layer's", "Red below 1%: the vanishing-gradient rule's "
               "relative test (a healthy deep net keeps every layer within a few decades).", "percentunit",
               [query(f"{grad} / on (job) group_left () max by (job) ({names.LAYER_GRAD_NORM}{{{JOB}}})", "{{layer}}")],
               limits=thresholds("red", (0.01, "green"))),
        series("Weight norm", "L2 norm of each layer's weights entering the step.", "short",
               [query(f"{names.LAYER_WEIGHT_NORM}{{{JOB}, {LAYER}}}", "{{layer}}")]),
        series("Update ratio ‖Δw‖/‖w‖", "Relative size of the latest sampled update; around 1e-3 is typical, "
               "far below means the layer is frozen, far above that it is thrashing.", "percentunit",
               [query(f"{names.LAYER_UPDATE_RATIO}{{{JOB}, {LAYER}}}", "{{layer}}")], log=True),
        series("Early/late gradient-norm ratio", "Norm of the first quarter of layers over the last quarter's; "
               "below 0.01 the early layers are not learning.", "short",
               [query(f"{names.GRAD_NORM_EARLY_LATE_RATIO}{{{JOB}}}", "early / late")], log=True),
        series("Largest |gradient| element", "+Inf when the layer's gradient holds a NaN/inf.", "short",
               [query(f"{names.LAYER_GRAD_MAX_ABS}{{{JOB}, {LAYER}}}", "{{layer}}")], log=True),
        series("Non-finite gradients", "1 while the layer's gradient holds NaN/inf.", "none",
               [query(f"{names.LAYER_GRAD_NONFINITE}{{{JOB}, {LAYER}}}", "{{layer}}")], w=24, h=6, bars=True),
    ]
    return dashboard(UID, "gradwatch / Layers", "Per-layer gradient norms, weight norms and update ratios.",
                     [job_variable(), layer_variable(names.LAYER_GRAD_NORM)], panels)
