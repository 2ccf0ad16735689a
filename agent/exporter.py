"""Prometheus exposition of the latest measured step (rank 0 only).

A custom collector renders the most recent `StepStats` at scrape time: the training thread only
swaps a reference, a scrape never waits on training, and a layer that disappears takes its series
with it. Series per job (an upper bound, reached once a loss, an eval loss and an update ratio
have been seen; see docs/metrics.md):

    5 * L  +  6 * A  +  3 * R  +  G  +  20  (+1 once a NaN origin is known, +1 in mode guard,
                                              +1 per command kind applied, at most 5)

L = reported layers (<= max_layers), A = hooked activation modules (<= max_activation_modules),
R = ranks, G = optimizer param groups. Only the 3 per-rank series carry a `rank` label.

The `job` label is the training job's name; scrape with `honor_labels: true` so Prometheus keeps it
instead of renaming it to `exported_job` (deploy/prometheus does).
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .stats import NanOrigin, StepStats, early_late_ratio

log = logging.getLogger("gradwatch.agent")

FEATURES = ("stats", "activations", "export", "jsonl")
SKIP_REASONS = ("amp_overflow", "nonfinite", "command")  # GradScaler's own skip; the guard's; skip_steps


class AgentState:
    """Counters and latest values the exporter reads; written by the agent's publisher thread."""

    def __init__(self, job: str, world_size: int, sharding: str, version: str) -> None:
        self.job = job
        self.world_size = world_size
        self.sharding = sharding
        self.version = version
        self.lock = threading.Lock()
        self.latest: Optional[StepStats] = None
        self.latest_activations = None
        self.latest_update: Optional[tuple[tuple[str, ...], list[float]]] = None
        self.latest_detail: Optional[tuple[tuple[str, ...], list[float], list[float]]] = None  # layers, max-abs, weight norm
        self.eval_loss: Optional[float] = None
        self.nan_origin: Optional[NanOrigin] = None
        self.steps_total = 0
        self.nonfinite_steps_total = 0
        self.skipped_steps_total = {reason: 0 for reason in SKIP_REASONS}
        self.collectives_total = 0
        self.host_syncs_total = 0
        self.errors_total = {f: 0 for f in FEATURES}
        self.last_step_time: Optional[float] = None
        self.guard_bound: Optional[float] = None  # mode "guard": the adaptive clip bound in force
        self.clipped_steps_total = 0  # by the guard or a set_clip_norm command
        self.commands_applied_total: dict[str, int] = {}  # by command kind; a kind appears once applied

    def record(self, stats: StepStats) -> None:
        with self.lock:
            self.latest = stats
            if stats.activations is not None:
                self.latest_activations = stats.activations
            if stats.layer_update_ratio is not None:
                self.latest_update = (stats.layers, stats.layer_update_ratio)
            if stats.layer_weight_norm is not None and stats.layer_grad_max_abs is not None:
                self.latest_detail = (stats.layers, stats.layer_grad_max_abs, stats.layer_weight_norm)
            if stats.nan_origin is not None and self.nan_origin is None:
                self.nan_origin = stats.nan_origin
            self.last_step_time = stats.time


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class StatsCollector:
    """prometheus_client collector over an `AgentState`."""

    def __init__(self, state: AgentState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        with s.lock:
            latest, acts, update, detail = s.latest, s.latest_activations, s.latest_update, s.latest_detail
            eval_loss, origin = s.eval_loss, s.nan_origin
            counters = dict(
                steps=s.steps_total, nonfinite_steps=s.nonfinite_steps_total,
                agent_collectives=s.collectives_total, agent_host_syncs=s.host_syncs_total,
            )
            errors = dict(s.errors_total)
            skipped = dict(s.skipped_steps_total)
            clipped, bound = s.clipped_steps_total, s.guard_bound
            applied = dict(s.commands_applied_total)
            last_time = s.last_step_time
        job = s.job

        info = _gauge("gradwatch_agent_info", "Agent build and topology (value is always 1).", ["job", "version", "world_size", "sharding"])
        info.add_metric([job, s.version, str(s.world_size), s.sharding], 1)
        yield info
        for name, doc in (
            ("steps", "Optimizer steps taken through the agent."),
            ("nonfinite_steps", "Measured steps with a NaN/inf gradient, loss or activation."),
            ("agent_collectives", "Collectives issued by the agent (documented: 0-2 per read of measured steps, up to 3 for the read at close; docs/agent.md)."),
            ("agent_host_syncs", "Host-device syncs made by the agent (documented: 1 per read of measured steps; docs/agent.md)."),
        ):
            c = CounterMetricFamily(f"gradwatch_{name}", doc, labels=["job"])
            c.add_metric([job], counters[name])
            yield c
        skip = CounterMetricFamily("gradwatch_skipped_steps", "Optimizer steps skipped (parameters unchanged), by reason.", labels=["job", "reason"])
        for reason, count in skipped.items():
            skip.add_metric([job, reason], count)
        yield skip
        err = CounterMetricFamily("gradwatch_agent_errors", "Internal agent failures per feature; a failed feature is switched off, training goes on.", labels=["job", "feature"])
        for feature in FEATURES:
            err.add_metric([job, feature], errors[feature])
        yield err
        c = CounterMetricFamily("gradwatch_clipped_steps", "Steps whose gradients were clipped (the guard or a set_clip_norm command).", labels=["job"])
        c.add_metric([job], clipped)
        yield c
        if applied:
            c = CounterMetricFamily("gradwatch_commands_applied", "Remediation commands applied on every rank, by kind.", labels=["job", "kind"])
            for kind, count in sorted(applied.items()):
                c.add_metric([job, kind], count)
            yield c
        if bound is not None:
            g = _gauge("gradwatch_guard_clip_bound", "The guard's adaptive bound on the global gradient norm (EMA mean + z * std).", ["job"])
            g.add_metric([job], bound)
            yield g
        if origin is not None:
            g = _gauge("gradwatch_nan_origin_step", "Step at which a non-finite value first appeared, with where.", ["job", "kind", "layer", "rank"])
            rank = ",".join(map(str, origin.ranks)) if 0 < len(origin.ranks) < s.world_size else "all"
            g.add_metric([job, origin.kind, origin.layer, rank], origin.step)
            yield g
        if eval_loss is not None:
            g = _gauge("gradwatch_eval_loss", "Latest validation loss passed to observe_eval().", ["job"])
            g.add_metric([job], eval_loss)
            yield g
        if latest is None:
            return
        yield from self._step_metrics(job, latest, last_time)
        yield from self._layer_metrics(job, latest, update, detail)
        if acts is not None:
            yield from self._activation_metrics(job, acts)

    @staticmethod
    def _step_metrics(job: str, st: StepStats, last_time: Optional[float]) -> Iterator[Metric]:
        for name, doc, value in (
            ("gradwatch_step", "Latest measured optimizer step.", st.step),
            ("gradwatch_grad_norm", "Global L2 norm of all gradients before clipping.", st.grad_norm),
            ("gradwatch_grad_norm_early_late_ratio", "Gradient norm of the first quarter of layers over the last quarter's.", early_late_ratio(st.layer_grad_norm)),
            ("gradwatch_last_step_timestamp_seconds", "Unix time of the latest measured step.", last_time),
            ("gradwatch_loss", "Training loss, mean across ranks.", st.loss_mean),
            ("gradwatch_loss_max", "Training loss, max across ranks.", st.loss_max),
        ):
            if value is not None:
                g = _gauge(name, doc, ["job"])
                g.add_metric([job], value)
                yield g
        lr = _gauge("gradwatch_learning_rate", "Learning rate per optimizer param group.", ["job", "param_group"])
        for i, value in enumerate(st.learning_rates):
            lr.add_metric([job, str(i)], value)
        yield lr
        amp_overflow = bool(st.extra.get("amp_overflow"))  # GradScaler skips these steps itself
        per_rank = (
            ("gradwatch_rank_loss", "This rank's local training loss.", lambda r: r.loss),
            ("gradwatch_rank_nonfinite", "Non-finite items on this rank this step (loss + activation modules + gradient layers; an AMP overflow's gradients do not count).",
             lambda r: int(r.loss_nonfinite) + r.nonfinite_modules + (0 if amp_overflow else r.nonfinite_layers)),
            ("gradwatch_rank_step_seconds", "This rank's wall time per step (data, forward, backward, optimizer, agent), since its previous measured step.", lambda r: r.step_seconds),
        )
        for name, doc, get in per_rank:
            g = _gauge(name, doc, ["job", "rank"])
            for r in st.ranks:
                value = get(r)
                if value is not None:
                    g.add_metric([job, str(r.rank)], value)
            yield g

    @staticmethod
    def _layer_metrics(job: str, st: StepStats, update, detail) -> Iterator[Metric]:
        columns = [
            ("gradwatch_layer_grad_norm", "Per-layer gradient L2 norm (full tensor, across shards).", st.layers, st.layer_grad_norm),
            ("gradwatch_layer_grad_nonfinite", "1 if the layer's gradient holds a NaN/inf.", st.layers, [float(b) for b in st.layer_grad_nonfinite]),
        ]
        if detail is not None:  # the latest detail step's (every detail_every steps)
            layers, max_abs, weight_norm = detail
            columns += [
                ("gradwatch_layer_grad_max_abs", "Per-layer largest absolute gradient element (latest detail step).", layers, max_abs),
                ("gradwatch_layer_weight_norm", "Per-layer weight L2 norm (latest detail step).", layers, weight_norm),
            ]
        for name, doc, layers, values in columns:
            g = _gauge(name, doc, ["job", "layer"])
            for layer, value in zip(layers, values):
                g.add_metric([job, layer], value)
            yield g
        if update is not None:
            g = _gauge("gradwatch_layer_update_ratio", "||dw||/||w|| of the latest sampled optimizer update.", ["job", "layer"])
            for layer, value in zip(*update):
                g.add_metric([job, layer], value)
            yield g

    @staticmethod
    def _activation_metrics(job: str, acts) -> Iterator[Metric]:
        columns = [
            ("gradwatch_activation_mean", "Mean of the module's output (sampled step).", acts.mean),
            ("gradwatch_activation_std", "Std of the module's output (sampled step).", acts.std),
            ("gradwatch_activation_max_abs", "Largest absolute output element (sampled step).", acts.max_abs),
            ("gradwatch_activation_nonfinite", "NaN/inf output elements (sampled step).", acts.nonfinite),
            ("gradwatch_activation_saturated_ratio", "Fraction of tanh/sigmoid inputs in the saturated range.", acts.saturated_ratio),
        ]
        if acts.dead_ratio is not None:
            columns.append(("gradwatch_activation_dead_ratio", "Fraction of units zero for every sample of the global batch.", acts.dead_ratio))
        for name, doc, values in columns:
            g = _gauge(name, doc, ["job", "layer"])
            for module, value in zip(acts.modules, values):
                g.add_metric([job, module], value)
            yield g


class MetricsServer:
    """The HTTP endpoint (read-only) serving one `AgentState`."""

    def __init__(self, state: AgentState, port: int, addr: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(state))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port: int = self._server.server_port
        log.info("gradwatch: serving Prometheus metrics on http://%s:%d/metrics", addr, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
