"""`HealthAgent`: the one object a training script talks to, and the wiring of the agent's pieces.

Where each part lives: schedule.py (which steps are measured and combined), layout.py (who measures
which tensor, and over which group), grad_stats.py and activations.py (the device work), packet.py
(the collectives), stats.py (a step's record, from reduced values), guard.py (skip or clip),
remediation.py (the commands in force), step_router.py (steps the framework calls), failopen.py (each
feature fails alone), heartbeat.py, exporter.py and publisher.py (the outputs).

`agent.step(optimizer, loss=loss)` replaces `optimizer.step()`. On a measured step it, in order:
  1. unscales AMP gradients (if a GradScaler is passed), so statistics are of true gradients;
  2. computes per-layer gradient and weight statistics on the device, and folds in the activation
     statistics the forward hooks accumulated since the last step;
  3. across ranks in mode observe, keeps the packet until about `combine_seconds` of measured steps
     are filled; then (at once in one process, in mode guard, or with a clip command in force) starts 0-2
     collectives for all of them (see packet.py) - the same on every rank, decided by the step
     counter and replicated state alone;
  4. steps the optimizer (through the scaler, if any) while they run, then waits for them and makes
     their 1 host copy. In mode guard, or with a clip command in force, it waits and copies before
     stepping instead: those decide from the reduced values;
  5. hands each step's record, in order, to the exporter (rank 0) and to the background publisher.

Costs (documented in docs/agent.md, counted in gradwatch_agent_* metrics):
  norm work per measured step: every local parameter; under DDP outside mode guard, each rank's share
  of the layers.
  host-device syncs: 1 per combination (per measured step in one process and in mode guard).
  collectives: 0 in one process; per combination, DDP: 1 (SUM), 2 if one of its steps is
  activation-sampled (SUM + MAX); sharded layouts (FSDP, HSDP, TP, FSDP2+TP, sharded experts):
  1 (SUM), 2 if one is a detail (max-abs, weight norms) or activation-sampled step; layouts where
  each layer is measured whole by one rank (pipeline stages, whole experts) as DDP.
  at construction: 2 all_gather_object on the default group, agreeing the job-wide layer plan.
  heartbeat (its own thread, not a collective): one c10d store write and read per heartbeat_s.

Fail-open: an exception inside the agent never reaches the training loop. A failure on one rank is
raised as a flag inside the next all-reduce, so every rank switches the failed feature off at the
same step and the collectives stay matched.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from .activations import ActivationMonitor, eligible
from .closing import ClosingGroup
from .config import AgentConfig
from .exporter import AgentState, MetricsServer
from .failopen import FailOpen
from .grad_stats import GradStats
from .guard import Decision, Guard, decide
from .heartbeat import OPTIMIZER, Beat, Heartbeat, Progress, hook_phases, install_stack_signal
from .layout import agree, decline
from .packet import Combined, Counters, Entry, Packet, Reduce
from .publisher import JsonlSink, Publisher
from .remediation import HALT_EXIT_CODE, AppliedCommand, Remediation
from .remote import CommandClient
from .schedule import Schedule
from .stats import RANK_FIELDS, RANK_INDEX, NanOrigin, StepStats, build_step_stats, find_nan_origin, rank_values
from .step_router import needs_closure, raw_step, route
from .topology import detect

if TYPE_CHECKING:
    from .alerting import EmbeddedRules

log = logging.getLogger("gradwatch.agent")

def _learning_rates(optimizer: torch.optim.Optimizer) -> list[Union[float, torch.Tensor]]:
    """Each group's learning rate as this step used it, without a host sync: a tensor (capturable and
    fused optimizers; a scheduler changes it in place) is copied on its device and read when the step
    is published; a group with none (Adafactor's relative step: `lr=None`) reads NaN."""
    rates: list[Union[float, torch.Tensor]] = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        try:
            rates.append(lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr))
        except (TypeError, ValueError, RuntimeError):
            rates.append(math.nan)
    return rates


_ATTACHED: "weakref.WeakKeyDictionary[Any, HealthAgent]" = weakref.WeakKeyDictionary()


def attached_agent(obj: Any) -> Optional["HealthAgent"]:
    """The agent already attached to this model or optimizer (its DDP/FSDP wrapper or inner module
    count too), or None: how adapters and `gradwatch run --auto-attach` avoid instrumenting twice."""
    for candidate in (obj, getattr(obj, "module", None)):
        if candidate is not None:
            try:
                agent = _ATTACHED.get(candidate)
            except TypeError:  # not weak-referenceable
                agent = None
            if agent is not None:
                return agent
    return None


__all__ = ["HALT_EXIT_CODE", "AppliedCommand", "HealthAgent", "attached_agent"]

Listener = Callable[[StepStats], None]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gradwatch")
    except Exception:
        return "unknown"


@dataclass
class _Measured:
    """A measured step whose packet is filled and waits to be combined with the next ones."""

    step: int
    packet: Packet
    amp: bool
    seconds: float  # the agent's own time on this step so far
    time: float  # wall-clock time it was measured
    learning_rates: list[Union[float, torch.Tensor]]  # tensors are read when the step is published


@dataclass
class _InFlight:
    """Measured steps whose packets are being reduced together."""

    steps: list[_Measured]
    combined: Combined


class HealthAgent:
    """Measures training health on every rank; see the module docstring for what a step costs."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        config: Optional[AgentConfig] = None,
        on_halt: Optional[Callable[[int], None]] = None,
        **settings: Any,
    ) -> None:
        """`settings` are AgentConfig fields (`job="my-run"`); they override `GRADWATCH_*` variables."""
        try:  # what can fail on one rank alone, before the ranks first meet (in agree)
            self.config = AgentConfig(**{**(config.model_dump() if config is not None else {}), **settings})
            self.topology = detect(model)
            hooked = bool(self.config.activation_every) and self.config.mode != "off"
            modules = [name for name, _ in eligible(model)] if hooked else []
        except Exception as exc:
            decline(exc)
            raise
        self.model = model
        self.optimizer = optimizer
        self.rank, self.world_size = self.topology.rank, self.topology.world_size
        self.state = AgentState(self.config.job, self.world_size, self.topology.sharding, _version())
        self.counters = Counters()
        self.last_stats: Optional[StepStats] = None
        self.nan_origin: Optional[NanOrigin] = None
        self._step = 0
        self.failopen = FailOpen(self.rank, self.state, stats_on=self.config.mode != "off")
        c = self.config
        self.guard = Guard(c.guard_alpha, c.guard_z_threshold, c.guard_warmup_steps, c.guard_max_norm) if c.mode == "guard" else None
        self.schedule = Schedule(c.stats_every, c.activation_every if hooked else 0, c.update_ratio_every,
                                 c.detail_every, c.combine_seconds, self.world_size)
        self.remediation = Remediation(self.rank, self.state)  # the commands in force, identical on every rank
        self._packets: dict[tuple[tuple[Entry, ...], int], Packet] = {}  # (spec, place in the combination) -> packet
        self._window: list[_Measured] = []  # measured steps not yet combined (mode observe)
        self._combine = 1  # measured steps per combination: from reduced step times, so equal on every rank
        self._on_halt = on_halt
        self._in_step = False  # re-entrancy: scaler.step() calls a wrapped optimizer's step
        self._listeners: list[Listener] = []
        self._last_fill = (time.perf_counter(), 0)  # (when, step) of this rank's latest measured step
        self._closing: Optional[ClosingGroup] = None  # reads the steps still pending at close()
        self._failed_exit = False  # left `with agent:` on an exception: the job did not finish
        # made at the first measured step, where every rank meets (closing.py)
        self._closing_due = self.world_size > 1 and self.failopen.on("stats") and c.mode == "observe" and c.combine_seconds > 0

        for obj in (model, getattr(model, "module", None), optimizer):
            if obj is not None:
                _ATTACHED[obj] = self
        # One plan for the whole job, agreed across ranks (layout.py). Mode observe: each piece of each
        # tensor measured by one of its holders; the guard reads every copy on every rank, to catch a
        # fault in one rank's copy before it steps.
        self.layout, named = agree(model, self.rank, self.world_size, rank_local_plain=self.topology.rank_local_plain,
                                   every_copy=self.guard is not None, depth=c.layer_depth, max_layers=c.max_layers,
                                   modules=modules)
        self.layers = self.layout.layers
        self._grads = GradStats([p for _, p in named], self.layout, self.topology.device)
        self._acts: Optional[ActivationMonitor] = None
        if hooked:
            self._acts = ActivationMonitor(model, self.topology.device, self.config.max_activation_modules, self.layout.modules)
            self._acts.begin_step(self._activation_due(0), reset_sentinel=True)

        self.metrics: Optional[MetricsServer] = None
        sinks: dict[str, Callable[[StepStats], None]] = {}
        self._jsonl: Optional[JsonlSink] = None
        if self.rank == 0 and self.failopen.on("stats"):
            if self.config.metrics_port is not None:
                try:
                    self.metrics = MetricsServer(self.state, self.config.metrics_port, self.config.metrics_addr)
                except Exception as exc:  # the metrics endpoint alone: JSONL and listeners go on
                    self.failopen.fail("metrics", exc)
            if self.config.jsonl_path is not None:
                try:
                    self._jsonl = JsonlSink(self.config.jsonl_path)
                    sinks["jsonl"] = self._jsonl
                except Exception as exc:
                    self.failopen.fail("jsonl", exc)
        self._publisher = Publisher(sinks, self.failopen.fail)
        self._progress = Progress()
        self._heartbeat: Optional[Heartbeat] = None
        self._phase_hooks: list[Any] = []
        if self.failopen.on("stats") and c.heartbeat_s > 0:
            install_stack_signal()
            try:
                self._phase_hooks = hook_phases(model, self._progress)
                self._heartbeat = Heartbeat(c.job, self.rank, self.world_size, self._progress, c.heartbeat_s,
                                            self._take_beats, lambda exc: self.failopen.fail("heartbeat", exc))
            except Exception as exc:
                self.failopen.fail("heartbeat", exc)
        self._remote: Optional[CommandClient] = None
        if self.rank == 0 and self.failopen.on("stats") and self.config.aggregator_url and self.config.aggregator_token:
            self._remote = CommandClient(self.config.aggregator_url, self.config.aggregator_token.get_secret_value(),
                                         self.config.job, self.config.command_poll_s, out_of_band=self._out_of_band)
            self.remediation.ack = self._ack

    @classmethod
    def from_env(cls, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, **settings: Any) -> "HealthAgent":
        """Configuration from `GRADWATCH_*` variables (as set by `gradwatch run`), `settings` on top."""
        return cls(model, optimizer, **settings)

    # ---- public surface -----------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps taken through the agent so far."""
        return self._step

    @property
    def metrics_port(self) -> Optional[int]:
        return self.metrics.port if self.metrics else None

    @property
    def commands_applied(self) -> list[AppliedCommand]:
        """Every command taken from the wire, in order (every rank holds the same list)."""
        return self.remediation.applied

    @property
    def stepping(self) -> bool:
        """Inside `step`, taking the optimizer's real step (a GradScaler calls `optimizer.step`)."""
        return self._in_step

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(stats)` for every measured step, on the publisher thread (rank 0)."""
        self._publisher.sinks[f"listener-{len(self._listeners)}"] = listener
        self._listeners.append(listener)

    def watch_rules(self, rules: Any = None, on_alert: Optional[Callable[..., None]] = None) -> Optional["EmbeddedRules"]:
        """Evaluate gradwatch's alert rules in this process (rank 0; None on other ranks): the
        built-in set, a `RuleSet`, or a rules YAML path. Alerts go to `on_alert` (default: logged)."""
        if self.rank != 0:
            return None
        from .alerting import EmbeddedRules

        watcher = EmbeddedRules(self.state, rules, on_alert)
        self.add_listener(watcher)
        return watcher

    def wrap(self, optimizer: Optional[torch.optim.Optimizer] = None,
             loss: Optional[Callable[[], Any]] = None) -> torch.optim.Optimizer:
        """Route `optimizer.step(closure)` itself through the agent (step_router.py), for training loops
        the user does not write (Lightning, the HF Trainer, `gradwatch run --auto-attach`). The closure,
        if any, runs first and its value is returned; the step's loss is `loss()` if given (an adapter
        that gathered it over micro-batches), else the closure's value. The call then measures, guards
        and steps exactly like `agent.step`; keyword arguments of the step reach the optimizer's own
        step. Idempotent.

        An optimizer whose step requires a closure (LBFGS re-evaluates the loss inside its step) is
        returned unwrapped: its step cannot run once the closure has already been consumed."""
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise TypeError("HealthAgent.wrap needs the optimizer (pass it here or to HealthAgent(...))")
        if needs_closure(optimizer):
            self.failopen.warn_once("wrap-closure", "gradwatch: %s.step needs a closure; not measured", type(optimizer).__name__)
            return optimizer
        route(self, optimizer, loss)
        _ATTACHED[optimizer] = self
        return optimizer

    def step(
        self,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        loss: Union[torch.Tensor, float, None] = None,
        scaler: Optional["torch.amp.GradScaler"] = None,
    ) -> Any:
        """Measure, then step the optimizer (via `scaler.step` if given; call `scaler.update()`
        yourself as usual). Returns what the optimizer's step returns.

        With gradient accumulation call this once per optimizer step; pass the step's loss (a tensor
        of micro-batch losses is averaged)."""
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise TypeError("HealthAgent.step needs the optimizer (pass it here or to HealthAgent(...))")
        step = self._step
        self._progress.enter(OPTIMIZER)
        self._apply_commands(step, optimizer)  # read with an earlier step's packet (mode observe)
        measured = self.failopen.on("stats") and self.schedule.measured(
            step, every_step=self._decides_from_stats() or self.remediation.skip_left > 0, activations=self._acts is not None)
        in_flight = self._measure(step, optimizer, loss, scaler) if measured else None
        if in_flight is not None and self._decides_from_stats():
            self._finish(in_flight)
            in_flight = None
            self._apply_commands(step, optimizer)  # read with this step's packet
        decision = self._decide(step)
        if self.failopen.on("stats") and self.schedule.update_snapshot_due(step):
            self.failopen.run("stats", self._grads.take_snapshot)
        if decision.clip_to is not None:
            self._clip(optimizer, decision.clip_to)
        result = None  # a skipped step leaves parameters and optimizer state (moments, step counts) untouched
        try:
            if not decision.skip:
                self._in_step = True
                result = scaler.step(optimizer) if scaler is not None else raw_step(optimizer)()
        finally:
            self._in_step = False
            if in_flight is not None:  # observe mode: the reduction ran while the optimizer stepped
                self._finish(in_flight)
        self._step += 1
        self._progress.completed(step)
        self.state.steps_total = self._step
        if self._acts is not None and self.failopen.on("stats"):
            acts = self._acts
            if not self.failopen.run("activations", lambda: acts.begin_step(self._activation_due(self._step), reset_sentinel=measured)):
                acts.failed = RuntimeError("begin_step failed")  # reported in the next all-reduce
        return result

    def observe_eval(self, value: Union[torch.Tensor, float]) -> None:
        """Record a validation loss (already reduced across ranks by the caller; rank 0's is exported)."""
        try:
            loss = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"observe_eval expects a number or a tensor, got {type(value).__name__}") from exc
        with self.state.lock:
            self.state.eval_loss = loss

    def close(self) -> None:
        """Read and publish the measured steps not yet combined, then flush the sinks and stop the
        metrics server and hooks. Safe to call twice.

        Across ranks the pending steps are read on a gloo group of the agent's own (closing.py): if
        not every rank closes within its timeout with the same steps pending, they are dropped (logged)."""
        self.failopen.run("stats", self._close_window)
        self.remediation.close(self._step)
        self._closing_due = False
        if self._closing is not None:
            self._closing.destroy()
            self._closing = None
        if self.metrics is not None and not self._failed_exit:
            with self.state.lock:
                self.state.finished = True
            self.failopen.run("metrics", self.metrics.await_scrape)
        for handle in self._phase_hooks:
            handle.remove()
        self._phase_hooks = []
        for feature, part in (("heartbeat", self._heartbeat), ("commands", self._remote), ("publish", self._publisher), ("jsonl", self._jsonl), ("metrics", self.metrics), ("activations", self._acts)):
            if part is not None:
                self.failopen.run(feature, part.close)
        self._jsonl, self.metrics, self._remote, self._heartbeat = None, None, None, None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every measured step read so far (combined, across ranks) has reached the
        JSON lines file and listeners (or was dropped because they fell behind); False if the time ran
        out first."""
        return self._publisher.flush(timeout)

    def _close_window(self) -> None:
        window, self._window = self._window, []
        if not window or not self.failopen.on("stats") or self._closing is None:  # none: steps are never left pending
            return
        hosts = self._closing.read([m.packet for m in window], [m.step for m in window], self.world_size, self.counters)
        if hosts is not None:
            self._publish_all(window, hosts, 0.0)

    def __enter__(self) -> "HealthAgent":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._failed_exit = exc_type is not None  # an exception ends the job: not "finished"
        self.close()

    # ---- the guard (mode "guard"): decisions from values every rank holds identically -----------

    def _decide(self, step: int) -> Decision:
        """Skip or clip this step: from the guard, and from commands in force (guard.py)."""
        stats = self.last_stats
        measured = stats if self.failopen.on("stats") and stats is not None and stats.step == step else None
        decision = decide(self.guard, measured, self.remediation.clip_norm)
        if not decision.skip and self.remediation.take_skip():
            decision = Decision(skip=True, reason="command")
        with self.state.lock:
            if self.guard is not None:
                self.state.guard_bound = self.guard.bound
            if decision.skip:
                self.state.skipped_steps_total[decision.reason] += 1
            if decision.clip_to is not None:
                self.state.clipped_steps_total += 1
        if decision.skip and self.rank == 0:
            why = "non-finite gradients or loss" if decision.reason == "nonfinite" else "skip_steps command"
            log.warning("gradwatch: skipped step %d on every rank (%s); parameters unchanged", step, why)
        return decision

    # ---- commands (the slow loop, remediation.py): applied from the reduced packet, on every rank alike

    def _apply_commands(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Every command read from a reduced packet and not yet applied: this step's when the packet was
        waited for before the optimizer's step (guard, clip in force), an earlier step's otherwise
        (applied before this step is measured, so a clip command clips this very step). Every rank
        reads the same packets at the same steps, so every rank applies them at the same step."""
        if self.remediation.pending:
            halt = self.remediation.apply_arrived(step, optimizer)
            if halt is not None:
                self._halt(step, halt)

    def _ack(self, command_id: str, step: int, outcome: str, detail: str) -> None:
        remote = self._remote
        if remote is not None:
            self.failopen.run("commands", lambda: remote.ack(command_id, step, outcome, detail))

    def _halt(self, step: int, reason: str) -> None:
        """Every rank, the same step: the user's checkpoint callback, then a clean exit (HALT_EXIT_CODE)."""
        if self.rank == 0:
            log.error("gradwatch: halting at step %d on every rank: %s", step, reason)
        if self._remote is not None:  # the ack first: the callback may take long, and a relaunch must not halt again
            self.failopen.run("commands", self._remote.close)
            self._remote = None
        if self._on_halt is not None:
            try:
                self._on_halt(step)
            except Exception as exc:
                log.error("gradwatch: on_halt callback failed on rank %d: %r", self.rank, exc)
        self.close()
        raise SystemExit(HALT_EXIT_CODE)

    def _clip(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Scale every gradient by max_norm / global norm: on the device, no host sync."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = torch.full((), self.last_stats.grad_norm, device=self.topology.device)  # type: ignore[union-attr]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    # ---- schedule (schedule.py): functions of the step counter and of replicated state only ------

    def _activation_due(self, step: int) -> bool:
        return self._acts is not None and self.schedule.activation_due(step)

    def _decides_from_stats(self) -> bool:
        """The guard and a clip command in force decide from this step's reduced values, so they wait
        for them before the optimizer's step; otherwise the reduction overlaps the optimizer's step."""
        return self.guard is not None or self.remediation.clip_norm is not None

    # ---- measuring ----------------------------------------------------------------------------

    def _spec(self, step: int) -> list[Entry]:
        shared = Reduce.SUM if self.world_size > 1 else Reduce.LOCAL
        spec = [Entry("ranks", shared, self.world_size * len(RANK_FIELDS)), Entry("command", shared, 3)]
        spec += self._grads.spec(with_detail=self.schedule.detail_due(step), with_update=self.schedule.update_due(step))
        if self._acts is not None:
            spec += self._acts.spec(self._activation_due(step))
        return spec

    def _packet(self, spec: list[Entry], place: int) -> Packet:
        """The packet for this spec at this place in the combination, zeroed: a handful of specs recur
        (detail, update and activation steps), so each is laid out once per place."""
        key = (tuple(spec), place)
        packet = self._packets.get(key)
        if packet is None:
            packet = self._packets[key] = Packet(spec, self.topology.device)
        else:
            packet.clear()
        return packet

    def _measure(self, step: int, optimizer: torch.optim.Optimizer, loss: Any, scaler: Any) -> Optional[_InFlight]:
        """Fill the step's packet; once the combination's steps are filled (every step when deciding
        from them), start their reduction, which `_finish` reads."""
        started = time.perf_counter()
        if self._closing_due:
            self._closing_due = False
            self._closing = ClosingGroup()
        try:
            packet = self._packet(self._spec(step), len(self._window))
        except Exception as exc:
            self.failopen.fail("stats", exc)
            self._window = []
            return None
        row = packet.slot("ranks").view(self.world_size, len(RANK_FIELDS))[self.rank]
        stats_ok = scaler is None or self.failopen.run("stats", lambda: self._unscale(scaler, optimizer))
        stats_ok = stats_ok and self.failopen.run("stats", lambda: self._fill_local(packet, row, loss, step))
        acts_ok = self._acts is None or self.failopen.run("activations", lambda: self._fill_activations(packet, row))
        row[RANK_INDEX["error"]].fill_(float((not stats_ok) + 2 * (not acts_ok)))
        amp = scaler is not None and scaler.is_enabled()
        measured = _Measured(step, packet, amp, 0.0, time.time(), _learning_rates(optimizer))
        self._window.append(measured)
        # A function of the step counter and of replicated state only: every rank combines at the same step.
        if self.world_size > 1 and len(self._window) < self._combine and not self._decides_from_stats():
            measured.seconds = time.perf_counter() - started
            return None
        window, self._window = self._window, []
        try:
            combined = Combined([m.packet for m in window], None, self.world_size, self.counters)
        except Exception as exc:  # a broken process group: nothing more can be matched, stop measuring
            self.failopen.fail("stats", exc)
            return None
        measured.seconds = time.perf_counter() - started
        return _InFlight(window, combined)

    def _finish(self, flight: _InFlight) -> None:
        """Wait for the steps' reduction, take their commands, decode and publish them in order."""
        started = time.perf_counter()
        try:
            hosts = flight.combined.to_host(self.counters)
        except Exception as exc:  # a broken process group: nothing more can be matched, stop measuring
            self.failopen.fail("stats", exc)
            return
        self._publish_all(flight.steps, hosts, time.perf_counter() - started)
        self._combine = self.schedule.steps_to_combine(hosts)

    def _publish_all(self, steps: list[_Measured], hosts: list[dict[str, list[float]]], read_seconds: float) -> None:
        """Take the steps' commands and publish them in order; `read_seconds` was paid by the last."""
        for measured, host in zip(steps, hosts):
            if not self.failopen.on("stats"):
                break
            self.remediation.arrive(host["command"])
            # agent_seconds: the agent's own time on the step, not the optimizer's or other steps'
            own = measured.seconds + (read_seconds if measured is steps[-1] else 0.0)
            # Decoding reads only values every rank holds identically, so if it fails it fails
            # everywhere, and every rank switches statistics off at the same step.
            self.failopen.run("stats", lambda: self._publish(measured, host, time.perf_counter() - own), disable=True)
        if not self.failopen.on("stats"):
            self._drop_activations()  # the same decision on every rank: stop paying for hooks

    def _drop_activations(self) -> None:
        if self._acts is not None:
            self._acts.close()
            self._acts = None

    @torch.no_grad()
    def _fill_local(self, packet: Packet, row: torch.Tensor, loss: Any, step: int) -> None:
        self._grads.add_gradients(packet)
        self._grads.add_weights(packet)
        if loss is not None:  # a non-finite loss reads as one on the host: no device test for it
            row[RANK_INDEX["has_loss"]].fill_(1.0)
            if isinstance(loss, torch.Tensor) and loss.device == self.topology.device:
                row[RANK_INDEX["loss"]].copy_(loss.mean(dtype=torch.float32) if loss.dim() else loss)
            else:  # a host tensor or a number: read on the host, then a fill (a host-to-device copy would sync)
                row[RANK_INDEX["loss"]].fill_(float(loss.float().mean() if isinstance(loss, torch.Tensor) else loss))
        # Everything the step took (data, forward, backward, the agent, the optimizer), per step since
        # this rank's previous measured step: the pace combine_seconds is shared out by.
        now, (then, then_step) = time.perf_counter(), self._last_fill
        row[RANK_INDEX["step_seconds"]].fill_((now - then) / max(1, step - then_step))
        self._last_fill = (now, step)
        cmd = self._remote.take() if self._remote is not None else None
        if cmd is not None:  # rank 0 alone writes; the SUM gives every rank these exact values
            self.remediation.send(cmd, packet.slot("command"))

    def _fill_activations(self, packet: Packet, row: torch.Tensor) -> None:
        assert self._acts is not None
        first, count = self._acts.first_bad()
        row[RANK_INDEX["first_bad_module"]].copy_(first)
        row[RANK_INDEX["nonfinite_modules"]].copy_(count)
        self._acts.fill(packet)

    def _unscale(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        try:
            scaler.unscale_(optimizer)
        except RuntimeError as exc:
            if "unscale_() has already been called" not in str(exc):
                raise

    def _publish(self, measured: _Measured, host: dict[str, list[float]], started: float) -> None:
        step, amp = measured.step, measured.amp
        errors = [int(e) for e in rank_values(host, self.world_size, "error")]
        if any(e & 1 for e in errors):
            self.failopen.fail("stats", RuntimeError(f"statistics failed on rank(s) {[r for r, e in enumerate(errors) if e & 1]}"))
            return
        module_names = self._acts.names if self._acts is not None else ()
        if any(e & 2 for e in errors) and self._acts is not None:
            self.failopen.fail("activations", RuntimeError(f"activation statistics failed on rank(s) {[r for r, e in enumerate(errors) if e & 2]}"))
            self._drop_activations()
            host = {k: v for k, v in host.items() if not k.startswith("act_")}
        activations = None
        if self._acts is not None:
            if "act_units" in host:
                self._acts.agree_units(host["act_units"])
            activations = (self._acts.names, self._acts.units)
        stats = build_step_stats(step, measured.time, host, self.layers, self.world_size,
                                 [float(lr) for lr in measured.learning_rates], self.layout.nonfinite_per_rank, activations)
        ranks = stats.ranks
        if amp and stats.nonfinite and not any(r.loss_nonfinite or r.nonfinite_modules for r in ranks):
            # fp16 overflow in the scaled gradients: routine, and GradScaler skips the step itself.
            stats.extra["amp_overflow"] = True
        elif stats.nonfinite and self.nan_origin is None:
            first_bad = [int(v) for v in rank_values(host, self.world_size, "first_bad_module")]
            stats.nan_origin = find_nan_origin(stats, first_bad, module_names, self.layout.ranks_holding)
            self.nan_origin = stats.nan_origin
            if self.rank == 0 and stats.nan_origin is not None:
                o = stats.nan_origin
                log.error("gradwatch: first non-finite %s at step %d, layer %s, rank(s) %s", o.kind, o.step, o.layer, list(o.ranks) or "all")
        stats.extra["agent_seconds"] = time.perf_counter() - started
        self.last_stats = stats
        if self.rank == 0:
            # Rank 0 alone, and each output on its own: the exporter's state, and the publisher that
            # feeds the JSONL file and the listeners (watch_rules), fail open separately; neither
            # touches "stats", which gates collectives.
            if self.failopen.on("export"):
                self.failopen.run("export", lambda: self._record(stats), disable=True)
            if self.failopen.on("publish"):
                self.failopen.run("publish", lambda: self._publisher.submit(stats), disable=True)

    def _out_of_band(self, cmd: Any) -> tuple[int, str]:
        """dump_stacks, on the command thread (the training thread may be the one that hangs)."""
        if self._heartbeat is None:
            raise RuntimeError("dump_stacks needs the heartbeat (heartbeat_s > 0); send SIGUSR1 to each rank instead")
        self._heartbeat.request_stack_dump()
        return self._progress.now[0], f"every rank writes its Python stacks to its log within {self.config.heartbeat_s:g} s"

    def _take_beats(self, beats: dict[int, Beat]) -> None:
        """Rank 0's heartbeat thread: every rank's latest progress, for the exporter."""
        with self.state.lock:
            self.state.heartbeats = beats

    def _record(self, stats: StepStats) -> None:
        """The exporter's view of this step (read by the metrics server thread, when it runs)."""
        with self.state.lock:
            self.state.nonfinite_steps_total += int(stats.nonfinite and not stats.extra.get("amp_overflow"))
            self.state.skipped_steps_total["amp_overflow"] += int(bool(stats.extra.get("amp_overflow")))
            self.state.collectives_total = self.counters.collectives
            self.state.host_syncs_total = self.counters.host_syncs
        self.state.record(stats)
