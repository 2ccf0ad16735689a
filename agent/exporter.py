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

import collections
import logging
import threading
import time
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..wire import metric_names as names
from .heartbeat import Beat
from .stats import NanOrigin, StepStats, early_late_ratio

log = logging.getLogger("gradwatch.agent")

# Each output fails open alone: "export" the exporter's state, "metrics" its HTTP endpoint, "publish"
# the thread feeding "jsonl" and the listeners, "commands" the aggregator client.
FEATURES = ("stats", "activations", "export", "metrics", "publish", "jsonl", "commands", "heartbeat")
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
        self.heartbeats: dict[int, Beat] = {}  # rank -> its latest published progress (heartbeat.py)
        self.finished = False  # close() ran without an exception: the end is not an outage (agent_down)
        self.scrapes: collections.deque[float] = collections.deque(maxlen=4)  # when the endpoint was last read

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
            counters = {
                names.STEPS_TOTAL: s.steps_total, names.NONFINITE_STEPS_TOTAL: s.nonfinite_steps_total,
                names.AGENT_COLLECTIVES_TOTAL: s.collectives_total, names.AGENT_HOST_SYNCS_TOTAL: s.host_syncs_total,
            }
            errors = dict(s.errors_total)
            skipped = dict(s.skipped_steps_total)
            clipped, bound = s.clipped_steps_total, s.guard_bound
            applied = dict(s.commands_applied_total)
            last_time = s.last_step_time
            beats = dict(s.heartbeats)
            finished = s.finished
            s.scrapes.append(time.time())  # after reading `finished`: a later scrape saw it
        job = s.job

        info = _gauge(names.AGENT_INFO, "Agent build and topology (value is always 1).", ["job", "version", "world_size", "sharding"])
        info.add_metric([job, s.version, str(s.world_size), s.sharding], 1)
        yield info
        done = _gauge(names.TRAINING_FINISHED, "1 once the agent was closed without an exception: the job ended, it did not die.", ["job"])
        done.add_metric([job], float(finished))
        yield done
        for name, doc in (
            (names.STEPS_TOTAL, "Optimizer steps taken through the agent."),
            (names.NONFINITE_STEPS_TOTAL, "Measured steps with a NaN/inf gradient, loss or activation."),
            (names.AGENT_COLLECTIVES_TOTAL, "Collectives issued by the agent (documented: 0-2 per read of measured steps, up to 3 for the read at close; docs/agent.md)."),
            (names.AGENT_HOST_SYNCS_TOTAL, "Host-device syncs made by the agent (documented: 1 per read of measured steps; docs/agent.md)."),
        ):
            c = CounterMetricFamily(name, doc, labels=["job"])
            c.add_metric([job], counters[name])
            yield c
        skip = CounterMetricFamily(names.SKIPPED_STEPS_TOTAL, "Optimizer steps skipped (parameters unchanged), by reason.", labels=["job", "reason"])
        for reason, count in skipped.items():
            skip.add_metric([job, reason], count)
        yield skip
        err = CounterMetricFamily(names.AGENT_ERRORS_TOTAL, "Internal agent failures per feature; a failed feature is switched off, training goes on.", labels=["job", "feature"])
        for feature in FEATURES:
            err.add_metric([job, feature], errors[feature])
        yield err
        c = CounterMetricFamily(names.CLIPPED_STEPS_TOTAL, "Steps whose gradients were clipped (the guard or a set_clip_norm command).", labels=["job"])
        c.add_metric([job], clipped)
        yield c
        if applied:
            c = CounterMetricFamily(names.COMMANDS_APPLIED_TOTAL, "Remediation commands applied on every rank, by kind.", labels=["job", "kind"])
            for kind, count in sorted(applied.items()):
                c.add_metric([job, kind], count)
            yield c
        if bound is not None:
            g = _gauge(names.GUARD_CLIP_BOUND, "The guard's adaptive bound on the global gradient norm (EMA mean + z * std).", ["job"])
            g.add_metric([job], bound)
            yield g
        if origin is not None:
            g = _gauge(names.NAN_ORIGIN_STEP, "Step at which a non-finite value first appeared, with where.", ["job", "kind", "layer", "rank"])
            rank = ",".join(map(str, origin.ranks)) if 0 < len(origin.ranks) < s.world_size else "all"
            g.add_metric([job, origin.kind, origin.layer, rank], origin.step)
            yield g
        yield from self._liveness_metrics(job, beats)
        if eval_loss is not None:
            g = _gauge(names.EVAL_LOSS, "Latest validation loss passed to observe_eval().", ["job"])
            g.add_metric([job], eval_loss)
            yield g
        if latest is None:
            return
        yield from self._step_metrics(job, latest, last_time)
        yield from self._layer_metrics(job, latest, update, detail)
        if acts is not None:
            yield from self._activation_metrics(job, acts)

    @staticmethod
    def _liveness_metrics(job: str, beats: dict[int, Beat]) -> Iterator[Metric]:
        if not beats:
            return
        for name, doc, get in (
            (names.RANK_LAST_STEP, "The rank's last completed optimizer step (every step, measured or not).", lambda b: b.last_step),
            (names.RANK_PHASE, "Where the rank's training thread is: 0 between steps, 1 forward, 2 after forward (loss, backward, "
             "gradient all-reduce), 3 optimizer step.", lambda b: b.phase),
            (names.RANK_PROGRESS_TIMESTAMP, "Unix time the rank's training thread entered its phase.", lambda b: b.progress_time),
            (names.RANK_HEARTBEAT_TIMESTAMP, "Unix time of the rank's latest heartbeat (its heartbeat thread runs).", lambda b: b.beat_time),
        ):
            g = _gauge(name, doc, ["job", "rank"])
            for rank, beat in sorted(beats.items()):
                g.add_metric([job, str(rank)], get(beat))
            yield g

    @staticmethod
    def _step_metrics(job: str, st: StepStats, last_time: Optional[float]) -> Iterator[Metric]:
        for name, doc, value in (
            (names.STEP, "Latest measured optimizer step.", st.step),
            (names.GRAD_NORM, "Global L2 norm of all gradients before clipping.", st.grad_norm),
            (names.GRAD_NORM_EARLY_LATE_RATIO, "Gradient norm of the first quarter of layers over the last quarter's.", early_late_ratio(st.layer_grad_norm)),
            (names.LAST_STEP_TIMESTAMP, "Unix time of the latest measured step.", last_time),
            (names.LOSS, "Training loss, mean across ranks.", st.loss_mean),
            (names.LOSS_MAX, "Training loss, max across ranks.", st.loss_max),
        ):
            if value is not None:
                g = _gauge(name, doc, ["job"])
                g.add_metric([job], value)
                yield g
        lr = _gauge(names.LEARNING_RATE, "Learning rate per optimizer param group.", ["job", "param_group"])
        for i, value in enumerate(st.learning_rates):
            lr.add_metric([job, str(i)], value)
        yield lr
        amp_overflow = bool(st.extra.get("amp_overflow"))  # GradScaler skips these steps itself
        per_rank = (
            (names.RANK_LOSS, "This rank's local training loss.", lambda r: r.loss),
            (names.RANK_NONFINITE, "Non-finite items on this rank this step (loss + activation modules + gradient layers; an AMP overflow's gradients do not count).",
             lambda r: int(r.loss_nonfinite) + r.nonfinite_modules + (0 if amp_overflow else r.nonfinite_layers)),
            (names.RANK_STEP_SECONDS, "This rank's wall time per step (data, forward, backward, optimizer, agent), since its previous measured step.", lambda r: r.step_seconds),
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
            (names.LAYER_GRAD_NORM, "Per-layer gradient L2 norm (full tensor, across shards).", st.layers, st.layer_grad_norm),
            (names.LAYER_GRAD_NONFINITE, "1 if the layer's gradient holds a NaN/inf.", st.layers, [float(b) for b in st.layer_grad_nonfinite]),
        ]
        if detail is not None:  # the latest detail step's (every detail_every steps)
            layers, max_abs, weight_norm = detail
            columns += [
                (names.LAYER_GRAD_MAX_ABS, "Per-layer largest absolute gradient element (latest detail step).", layers, max_abs),
                (names.LAYER_WEIGHT_NORM, "Per-layer weight L2 norm (latest detail step).", layers, weight_norm),
            ]
        for name, doc, layers, values in columns:
            g = _gauge(name, doc, ["job", "layer"])
            for layer, value in zip(layers, values):
                g.add_metric([job, layer], value)
            yield g
        if update is not None:
            g = _gauge(names.LAYER_UPDATE_RATIO, "||dw||/||w|| of the latest sampled optimizer update.", ["job", "layer"])
            for layer, value in zip(*update):
                g.add_metric([job, layer], value)
            yield g

    @staticmethod
    def _activation_metrics(job: str, acts) -> Iterator[Metric]:
        columns = [
            (names.ACTIVATION_MEAN, "Mean of the module's output (sampled step).", acts.mean),
            (names.ACTIVATION_STD, "Std of the module's output (sampled step).", acts.std),
            (names.ACTIVATION_MAX_ABS, "Largest absolute output element (sampled step).", acts.max_abs),
            (names.ACTIVATION_NONFINITE, "NaN/inf output elements (sampled step).", acts.nonfinite),
            (names.ACTIVATION_SATURATED_RATIO, "Fraction of tanh/sigmoid inputs in the saturated range.", acts.saturated_ratio),
        ]
        if acts.dead_ratio is not None:
            columns.append((names.ACTIVATION_DEAD_RATIO, "Fraction of units zero for every sample of the global batch.", acts.dead_ratio))
        for name, doc, values in columns:
            g = _gauge(name, doc, ["job", "layer"])
            for module, value in zip(acts.modules, values):
                g.add_metric([job, module], value)
            yield g


class MetricsServer:
    """The HTTP endpoint (read-only) serving one `AgentState`."""

    def __init__(self, state: AgentState, port: int, addr: str) -> None:
        self.state = state
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(state))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port: int = self._server.server_port
        log.info("gradwatch: serving Prometheus metrics on http://%s:%d/metrics", addr, self.port)

    def await_scrape(self, max_wait_s: float = 60.0) -> bool:
        """Training ended: if something scrapes this endpoint (two scrapes seen), wait for its next
        scrape, at most 2.5 of its intervals, so it reads gradwatch_training_finished before the series
        go; else the end would look like an outage (agent_down). True if a scrape came."""
        with self.state.lock:
            times = list(self.state.scrapes)
        if len(times) < 2:
            return False
        start = time.time()
        deadline = start + min(max_wait_s, max(1.0, 2.5 * (times[-1] - times[-2])))
        while time.time() < deadline:
            with self.state.lock:
                if self.state.scrapes and self.state.scrapes[-1] > start:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
