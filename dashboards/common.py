"""What the four dashboards share: the template variables, the datasource reference every query and
annotation uses, and one way to make a panel, so a dashboard module only says what it shows."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from ..wire import metric_names as names

# Every panel, target, variable and annotation names the `datasource` variable, never a fixed uid,
# so one dashboard works against any Prometheus; it defaults to the one deploy/grafana provisions.
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PROVISIONED_DATASOURCE_UID = "gradwatch-prometheus"
TAG = "gradwatch"

# Label matchers every query carries: one job; the layer/rank variables are multi-value with an
# "All" of `.*`, hence `=~`.
JOB = 'job="$job"'
LAYER = 'layer=~"$layer"'
RANK = 'rank=~"$rank"'


def datasource_variable() -> db.DatasourceVariable:
    return (
        db.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(dm.VariableOption(selected=True, text=PROVISIONED_DATASOURCE_UID, value=PROVISIONED_DATASOURCE_UID))
    )


def _query_variable(name: str, label: str, query: str, multi: bool, sort: dm.VariableSort) -> db.QueryVariable:
    v = (
        db.QueryVariable(name).label(label).query(query).datasource(DATASOURCE)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
    )
    if multi:
        v = v.multi(True).include_all(True).all_value(".*").current(dm.VariableOption(selected=True, text="All", value="$__all"))
    return v


def job_variable() -> db.QueryVariable:
    """Jobs that ever reported a step: every agent exports gradwatch_step."""
    return _query_variable("job", "Job", f"label_values({names.STEP}, job)", False, dm.VariableSort.ALPHABETICAL_ASC)


def layer_variable(metric: str) -> db.QueryVariable:
    """Layers of `metric`: parameter layers (fc1.weight) and activation modules (fc1) are named apart."""
    return _query_variable("layer", "Layer", f"label_values({metric}{{{JOB}}}, layer)", True, dm.VariableSort.NATURAL_ASC)


def rank_variable() -> db.QueryVariable:
    return _query_variable("rank", "Rank", f"label_values({names.RANK_LOSS}{{{JOB}}}, rank)", True, dm.VariableSort.NUMERICAL_ASC)


def query(expr: str, legend: str = "", table: bool = False) -> prometheus.Dataquery:
    """A range query drawn as series named by `legend`, or (table) the latest value per series as rows."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    return q.instant().format(PromQueryFormat.TABLE) if table else q.range()


def thresholds(base: str, *steps: tuple[float, str]) -> db.ThresholdsConfig:
    """Colour `base` below the first step, then each step's colour from its value up."""
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=None, color=base)] + [dm.Threshold(value=v, color=c) for v, c in steps]
    )


def panel(p: Any, title: str, description: str, unit: str, targets: Sequence[prometheus.Dataquery], w: int = 12, h: int = 8) -> Any:
    """Title, description, unit, size and targets (refIds A, B, ...) of any panel builder."""
    p = p.title(title).description(description).unit(unit).datasource(DATASOURCE).span(w).height(h)
    for ref, target in zip("ABCDEFGH", targets):
        p = p.with_target(target.ref_id(ref))
    return p


def series(title: str, description: str, unit: str, targets: Sequence[prometheus.Dataquery], w: int = 12, h: int = 8,
           log: bool = False, bars: bool = False) -> timeseries.Panel:
    """A time series; `log` for norms that span decades (an exploding run), `bars` for per-step counts."""
    p = timeseries.Panel().legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.LIST)
                                  .placement(cm.LegendPlacement.BOTTOM))
    if log:
        p = p.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
    if bars:
        p = p.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    return panel(p, title, description, unit, targets, w, h)


def latest(title: str, description: str, unit: str, targets: Sequence[prometheus.Dataquery], w: int = 12, h: int = 8,
           limits: Optional[db.ThresholdsConfig] = None) -> bargauge.Panel:
    """One bar per series at its last value: which layer or rank is the odd one now."""
    p = (bargauge.Panel().orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.BASIC)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if limits is not None:
        p = p.thresholds(limits)
    return panel(p, title, description, unit, targets, w, h)


def single(title: str, description: str, unit: str, target: prometheus.Dataquery, w: int = 6, h: int = 4,
           limits: Optional[db.ThresholdsConfig] = None, no_value: str = "") -> stat.Panel:
    p = stat.Panel().reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)).graph_mode(cm.BigValueGraphMode.AREA)
    if limits is not None:
        p = p.thresholds(limits)
    if no_value:
        p = p.no_value(no_value)
    return panel(p, title, description, unit, [target], w, h)


def rows(title: str, description: str, target: prometheus.Dataquery, w: int = 12, h: int = 8) -> table.Panel:
    """Latest value per series as table rows (label columns, `Time` hidden)."""
    p = table.Panel().override_by_name("Time", [dm.DynamicConfigValue(id_val="custom.hidden", value=True)])
    return panel(p, title, description, "none", [target], w, h)


class _PrometheusAnnotation(dm.AnnotationQuery):
    """The SDK's AnnotationQuery lacks the Prometheus fields that name an event (titleFormat, tagKeys)."""

    def __init__(self, title_format: str, tag_keys: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.title_format, self.tag_keys = title_format, tag_keys

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "titleFormat": self.title_format, "tagKeys": self.tag_keys, "useValueForTime": False}


class Annotation(cogbuilder.Builder[dm.AnnotationQuery]):
    def __init__(self, name: str, expr: str, color: str, title_format: str, tag_keys: str = "") -> None:
        self._internal = _PrometheusAnnotation(
            title_format, tag_keys, name=name, datasource=DATASOURCE, enable=True, icon_color=color, expr=expr
        )

    def build(self) -> dm.AnnotationQuery:
        return self._internal


def dashboard(uid: str, title: str, description: str, variables: Sequence[Any], panels: Sequence[Any],
              annotations: Sequence[Any] = ()) -> db.Dashboard:
    """A gradwatch dashboard: stable uid, panel ids 1..n in order, links to its siblings by tag."""
    d = (
        db.Dashboard(title).uid(uid).description(description).tags([TAG]).editable()
        .time("now-1h", "now").refresh("10s").tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(db.DashboardLink("gradwatch").type(dm.DashboardLinkType.DASHBOARDS).tags([TAG])
              .as_dropdown(True).include_vars(True).keep_time(True))
    )
    d = d.with_variable(datasource_variable())
    for v in variables:
        d = d.with_variable(v)
    for a in annotations:
        d = d.annotation(a)
    for i, p in enumerate(panels, start=1):
        d = d.with_panel(p.id(i))
    return d

