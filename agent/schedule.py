"""Which steps are measured, what rides on them, and how many are combined per collective.

Every answer is a function of the step counter, the configuration and reduced values alone - never
of wall-clock time or of one rank's state - so every rank measures, combines and issues its
collectives at the same steps (a rank that decided differently would hang the job).
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import RANK_FIELDS, RANK_INDEX

# The most measured steps one combination holds (combine_seconds sets how many, up to this): bounds the
# packets kept, and what a lone close() can drop.
MAX_COMBINED = 16


@dataclass(frozen=True)
class Schedule:
    stats_every: int
    activation_every: int  # 0: no activation statistics
    update_ratio_every: int  # 0: no update ratios
    detail_every: int
    combine_seconds: float
    world_size: int

    def activation_due(self, step: int) -> bool:
        return self.activation_every > 0 and step % self.activation_every == 0

    def update_snapshot_due(self, step: int) -> bool:
        """The weights are copied before this step's optimizer step, for the next step's update ratio."""
        return self.update_ratio_every > 0 and step % self.update_ratio_every == 0

    def update_due(self, step: int) -> bool:
        return step >= 1 and self.update_snapshot_due(step - 1)

    def detail_due(self, step: int) -> bool:
        """Max-abs and weight norms ride on a measured step whose number is a multiple of detail_every;
        they never add a measured step (a collective and a sync) of their own."""
        return step % self.detail_every == 0

    def measured(self, step: int, *, every_step: bool, activations: bool) -> bool:
        """`every_step`: a decision needs every step's reduced norm (the guard, a clip or skip command in
        force; GradScaler its unscale_). `activations`: the activation hooks are still on."""
        if every_step:
            return True
        return (step % self.stats_every == 0 or (activations and self.activation_due(step))
                or self.update_due(step))

    def steps_to_combine(self, hosts: list[dict[str, list[float]]]) -> int:
        """How many measured steps the next combination holds: as many of the slowest step just read
        (on its slowest rank) as fit in `combine_seconds`, and at most twice as many as were just read,
        so one unrepresentative step (the first one timed from construction) cannot jump to 16. Reduced
        values only, identical on every rank, so every rank combines the same steps."""
        if self.world_size == 1 or self.combine_seconds == 0:
            return 1
        width, at = len(RANK_FIELDS), RANK_INDEX["step_seconds"]
        pace = max(h["ranks"][r * width + at] for h in hosts for r in range(self.world_size)) * self.stats_every
        if not pace > 0:
            return 1
        fit = min(self.combine_seconds / pace, MAX_COMBINED)
        return max(1, min(2 * len(hosts), int(fit)))
