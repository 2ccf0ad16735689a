"""The remediation policy: firing alerts -> commands, with per-job rate limits, a learning-rate
floor and a dry-run switch. Defaults: exploding -> tighten the clip to a quantile of the
job's recent gradient norms; exploding again within `repeat_window`, or NaN -> scale the learning
rate by `lr_factor`; vanishing -> page only (no automatic fix exists for an architecture).
Every decision, including the ones it declines, is in the audit log."""

from __future__ import annotations

import logging
import math
from typing import Optional

from ...wire import metric_names as names
from ...wire.commands import DumpStacks, ScaleLr, SetClipNorm
from ..evaluate.alerts import FIRING, Transition
from ..rules.promql import Call, metric
from ..rules.specs import PolicySpec
from .clients import QuerySource
from .command_store import CommandStore

log = logging.getLogger("gradwatch.aggregator")


class Policy:
    def __init__(self, spec: PolicySpec, commands: CommandStore, prometheus: QuerySource) -> None:
        self.spec, self.commands, self.prometheus = spec, commands, prometheus

    def react(self, changes: list[Transition], now: float) -> None:
        if not self.spec.enabled:
            return
        fired: dict[str, set[str]] = {}
        for change in changes:
            if change.after == FIRING:
                fired.setdefault(change.alert.job, set()).add(change.alert.rule)
        for job, rules in fired.items():
            if not job:
                continue
            lower_lr = None
            if "exploding_gradient" in rules:
                if self._clip_applied_recently(job, now):  # the applied clip did not stop it
                    lower_lr = f"exploding_gradient fired again within {self.spec.repeat_window} s of an applied clip"
                self._clip(job, now)
            if "nan_gradient" in rules:
                lower_lr = "nan_gradient fired"
            if lower_lr is not None:  # at most one LR cut per job per round
                self._scale_lr(job, now, lower_lr)
            if "training_stalled" in rules and self.spec.dump_stacks_on_stall:  # where it hangs, in every rank's log
                self._issue(job, DumpStacks(reason="training_stalled: every rank writes its Python stacks"), "training_stalled", now)

    def _clip_applied_recently(self, job: str, now: float) -> bool:
        return any(c.source == "policy" and c.spec.kind == "set_clip_norm" and c.state == "acked"
                   and c.created_at >= now - self.spec.repeat_window for c in self.commands.commands(job))

    def _clip(self, job: str, now: float) -> None:
        query = Call("quantile_over_time", metric(names.GRAD_NORM, self.spec.clip_window, matchers=(("job", "=", job),)),
                     self.spec.clip_quantile)
        try:
            values = [s.value for s in self.prometheus.query(query, now) if math.isfinite(s.value) and s.value > 0]
        except Exception as exc:
            self.commands.audit(job, "policy_failed", {"alert": "exploding_gradient", "error": repr(exc)})
            return
        if not values:
            self.commands.audit(job, "policy_declined", {"alert": "exploding_gradient", "why": "no finite recent gradient norm"})
            return
        clip, _ = self._in_force(job)
        if clip is not None and clip <= min(values):
            self.commands.audit(job, "policy_declined", {"alert": "exploding_gradient", "why": f"already clipped at {clip:g}"})
            return
        self._issue(job, SetClipNorm(max_norm=min(values), reason=f"exploding_gradient: clip to the p{self.spec.clip_quantile * 100:g} of recent norms"), "exploding_gradient", now)

    def _in_force(self, job: str) -> tuple[Optional[float], float]:
        """(clip norm, LR factor) the job's pending and applied commands add up to, replayed the way
        the agent applies them: an applied reset clears both."""
        clip, factor = None, 1.0
        for c in self.commands.commands(job):
            if c.spec.kind == "reset" and c.state == "acked":
                clip, factor = None, 1.0
            elif c.state in ("pending", "acked"):
                if c.spec.kind == "set_clip_norm":
                    clip = c.spec.max_norm  # type: ignore[union-attr]
                elif c.spec.kind == "scale_lr":
                    factor *= c.spec.factor  # type: ignore[union-attr]
        return clip, factor

    def _scale_lr(self, job: str, now: float, why: str) -> None:
        _, in_force = self._in_force(job)
        if in_force * self.spec.lr_factor < self.spec.min_lr_fraction:
            self.commands.audit(job, "policy_declined", {"why": f"learning rate already at {in_force:g}x; floor {self.spec.min_lr_fraction:g}x", "alert": why})
            return
        self._issue(job, ScaleLr(factor=self.spec.lr_factor, reason=why), why.split(" ")[0], now)

    def _issue(self, job: str, spec, alert: str, now: float) -> Optional[str]:
        recent = [c for c in self.commands.commands(job) if c.source == "policy" and c.created_at >= now - self.spec.rate_window]
        if len(recent) >= self.spec.max_commands:
            self.commands.audit(job, "policy_declined", {"alert": alert, "kind": spec.kind, "why": f"rate limit: {len(recent)} commands in {self.spec.rate_window} s"})
            return None
        if self.spec.dry_run:
            self.commands.audit(job, "policy_dry_run", {"alert": alert, **spec.model_dump(mode="json")})
            log.warning("gradwatch aggregator: policy (dry run) would send %s to %s", spec.kind, job)
            return None
        cmd = self.commands.submit(job, spec, "policy")
        self.commands.audit(job, "policy", {"alert": alert, "kind": spec.kind}, cmd.id)
        log.warning("gradwatch aggregator: policy sent %s to %s (%s)", spec.kind, job, spec.reason)
        return cmd.id
