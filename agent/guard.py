"""The fast loop (mode `guard`): skip a non-finite step and clip gradient-norm spikes, in process.

Decisions read only the step's decoded statistics, which every rank holds identically (they come out
of the same all-reduce), plus this object's state, which every rank updates from those same values.
So every rank skips or clips the same step with no extra collective.

Adaptive clipping follows ZClip's design (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): an exponential moving mean and
variance of the global gradient norm; after a warm-up, a norm whose z-score exceeds `z_threshold`
is clipped to `mean + z_threshold**2 * std / z` (the larger the spike, the tighter the bound), and
the statistics are updated with the clipped value so one spike does not drag the baseline up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .stats import StepStats


@dataclass(frozen=True)
class Decision:
    skip: bool = False
    clip_to: Optional[float] = None  # scale gradients so the global norm is this
    reason: str = ""


class Guard:
    def __init__(self, alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, max_norm: Optional[float] = None) -> None:
        self.alpha, self.z_threshold, self.warmup_steps, self.max_norm = alpha, z_threshold, warmup_steps, max_norm
        self.mean: Optional[float] = None
        self.var = 0.0
        self._warmup: list[float] = []
        self.bound: Optional[float] = None  # the adaptive bound computed for the latest step (exported)

    def decide(self, grad_norm: float, nonfinite: bool) -> Decision:
        """What to do with this step's gradients, from values every rank holds identically."""
        if nonfinite or not math.isfinite(grad_norm):
            return Decision(skip=True, reason="nonfinite")
        clip: Optional[float] = None
        if self.mean is not None:
            std = math.sqrt(self.var)
            self.bound = self.mean + self.z_threshold * std
            z = (grad_norm - self.mean) / std if std > 0 else 0.0
            if z > self.z_threshold:
                clip = self.mean + self.z_threshold ** 2 * std / z
        if self.max_norm is not None and grad_norm > self.max_norm:
            clip = self.max_norm if clip is None else min(clip, self.max_norm)
        self._observe(grad_norm if clip is None else clip)
        return Decision(clip_to=clip, reason="spike" if clip is not None else "")

    def _observe(self, norm: float) -> None:
        if self.mean is None:
            self._warmup.append(norm)
            if len(self._warmup) >= self.warmup_steps:
                n = len(self._warmup)
                self.mean = sum(self._warmup) / n
                self.var = sum((v - self.mean) ** 2 for v in self._warmup) / n
            return
        delta = norm - self.mean
        self.mean += (1 - self.alpha) * delta
        self.var = self.alpha * (self.var + (1 - self.alpha) * delta * delta)


def decide(guard: Optional[Guard], stats: Optional[StepStats], clip_norm: Optional[float]) -> Decision:
    """Skip or clip this step, from its statistics: the guard's decision (mode guard), then a
    set_clip_norm bound in force. `stats` is None when the step was not measured, or statistics are
    off (fail-open: on every rank alike); an fp16 overflow is GradScaler's to skip, not the guard's."""
    if stats is None or stats.extra.get("amp_overflow"):
        return Decision()
    decision = guard.decide(stats.grad_norm, stats.nonfinite) if guard is not None else Decision()
    if not decision.skip and clip_norm is not None and stats.grad_norm > clip_norm:
        decision = Decision(clip_to=min(decision.clip_to or math.inf, clip_norm), reason="command")
    return decision
