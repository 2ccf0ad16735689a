"""Fail-open by feature: an exception inside gradwatch never reaches the training loop, and switches
off only the feature it came from.

Features (exporter.FEATURES, each counted in gradwatch_agent_errors_total): stats (the measured steps
and their collectives), activations, export (the exporter's state), metrics (the HTTP endpoint),
publish (the thread feeding JSONL and listeners), jsonl, commands, heartbeat. Each fails alone: a busy metrics port loses the endpoint, not the JSONL rows or
the in-process alerts. A feature that gates collectives (stats, activations) is not switched off
where it failed: the rank raises its error flag in the next all-reduce, so every rank switches it
off at the same step and the collectives stay matched.
"""

from __future__ import annotations

import logging
from typing import Callable

from .exporter import FEATURES, AgentState

log = logging.getLogger("gradwatch.agent")

class FailOpen:
    def __init__(self, rank: int, state: AgentState, stats_on: bool) -> None:
        self.rank = rank
        self.state = state  # errors_total is counted there, by feature (exported)
        self._on = {feature: True for feature in FEATURES}
        self._on["stats"] = stats_on
        self._warned: set[str] = set()

    def on(self, feature: str) -> bool:
        return self._on[feature]

    def run(self, feature: str, fn: Callable[[], None], disable: bool = False) -> bool:
        """Run `fn`; on failure log once and count (and switch the feature off if `disable`)."""
        try:
            fn()
            return True
        except Exception as exc:
            self.fail(feature, exc, disable=disable)
            return False

    def fail(self, feature: str, exc: BaseException, disable: bool = True) -> None:
        """Log a failure once per feature, count it, and (unless the caller coordinates) switch it off."""
        with self.state.lock:
            self.state.errors_total[feature] = self.state.errors_total.get(feature, 0) + 1
        if disable:
            self._on[feature] = False
        if feature not in self._warned:
            self._warned.add(feature)
            log.error("gradwatch: %s failed on rank %d and is switched off; training goes on: %r",
                      feature, self.rank, exc, exc_info=exc)

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
