"""What a demo run did, as it happens (`RunLog`) and at the end (`Summary`, written by `--summary`).

The summary's schema is the pydantic model below (`Summary.model_json_schema()`; documented in
docs/demo.md). Non-finite numbers become null in the summary so any JSON reader can load it; the
event stream keeps them.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field


class AlertRecord(BaseModel):
    alertname: str
    state: Literal["firing", "resolved"]
    severity: str = ""
    labels: dict[str, str] = Field(default_factory=dict, description="job, kind, layer, rank, severity, alertname")
    step: Optional[int] = Field(None, description="latest training step when the transition was seen")
    time: float = Field(description="Unix time of the transition")


class CommandRecord(BaseModel):
    step: int = Field(description="the step at which every rank applied it")
    kind: str
    value: float
    outcome: Literal["applied", "rejected"]


class PageRecord(BaseModel):
    receiver: str = Field(description="the Alertmanager receiver: training-pager (critical) or training-chat")
    alertname: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    time: float = Field(description="Unix time the webhook received it")


class GuardRecord(BaseModel):
    skipped_steps: list[int] = Field(default_factory=list, description="steps skipped on every rank (parameters unchanged)")
    clipped_steps: list[int] = Field(default_factory=list, description="steps whose gradients were clipped")


class Summary(BaseModel):
    """One `gradwatch demo` run."""

    schema_version: Literal[1] = 1
    scenario: str
    stack: Literal["full", "embedded"]
    job: str
    world_size: int
    steps: int = Field(description="optimizer steps completed")
    final_loss: Optional[float] = Field(description="mean loss across ranks at the last measured step; null if non-finite or none")
    exit_code: int = Field(description="the training job's exit code (86: halted by a command)")
    halted: bool
    interrupted: bool = Field(description="the demo was stopped (Ctrl-C or SIGTERM) before the job finished")
    nan_origin: Optional[dict[str, Any]] = Field(description="step, kind, layer and ranks of the first non-finite value")
    expected_alerts: list[str] = Field(description="what this scenario should raise")
    alerts: list[AlertRecord]
    commands: list[CommandRecord]
    guard: GuardRecord
    pages: list[PageRecord] = Field(description="notifications Alertmanager delivered (full stack only)")
    plots: list[str] = Field(description="PNG files written")
    duration_s: float


def by_alertname(alerts: list[AlertRecord]) -> dict[str, list[AlertRecord]]:
    """Firing records grouped by rule, in order of first firing: one line per rule, not per layer."""
    groups: dict[str, list[AlertRecord]] = {}
    for a in alerts:
        if a.state == "firing":
            groups.setdefault(a.alertname, []).append(a)
    return groups


def where(alerts: list[AlertRecord], limit: int = 3) -> str:
    """`layer=3 rank=1 kind=activation`, or `on 24 layers: 0.0.bias, 0.0.weight, 1.0.bias, ...`."""
    if len(alerts) == 1:
        return " ".join(f"{k}={alerts[0].labels[k]}" for k in ("layer", "rank", "kind") if alerts[0].labels.get(k))
    layers = [a.labels.get("layer", "") for a in alerts]
    shown = ", ".join(layers[:limit]) + (", ..." if len(layers) > limit else "")
    return f"on {len(alerts)} layers: {shown}"


def finite(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class RunLog:
    """Everything seen so far: fed from the event stream, the aggregator and the pager."""

    def __init__(self, scenario: str, job: str) -> None:
        self.scenario, self.job = scenario, job
        self.start: Optional[dict] = None
        self.end: Optional[dict] = None
        self.steps: list[dict] = []
        self.alerts: list[AlertRecord] = []
        self.commands: list[CommandRecord] = []
        self.guard = GuardRecord()
        self.pages: list[PageRecord] = []
        self._firing: dict[str, AlertRecord] = {}  # alert identity -> its firing record

    @property
    def last_step(self) -> Optional[dict]:
        return self.steps[-1] if self.steps else None

    def add_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "start":
            self.start = event
        elif kind == "end":
            self.end = event
        elif kind == "step":
            self.steps.append(event)
            if event.get("skipped"):
                self.guard.skipped_steps.append(event["step"])
            if event.get("clipped"):
                self.guard.clipped_steps.append(event["step"])
        elif kind == "command":
            self.commands.append(CommandRecord(step=event["step"], kind=event["kind"], value=event["value"], outcome=event["outcome"]))
        elif kind == "alert":
            self.transition(event["labels"], event["state"], event.get("step"), event["time"])

    def transition(self, labels: dict[str, str], state: str, step: Optional[int], when: float) -> None:
        """Record a firing or resolved alert once (the aggregator is polled; the embedded rules push)."""
        key = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
        if (state == "firing") == (key in self._firing):
            return
        record = AlertRecord(alertname=labels.get("alertname", "?"), state=state, severity=labels.get("severity", ""),
                             labels=labels, step=step, time=when)
        if state == "firing":
            self._firing[key] = record
        else:
            del self._firing[key]
        self.alerts.append(record)

    def active(self, labels_seen: list[dict[str, str]], when: float) -> None:
        """The aggregator's firing alerts right now: new ones fire, vanished ones resolve."""
        step = self.last_step["step"] if self.last_step else None
        keys = set()
        for labels in labels_seen:
            keys.add(",".join(f"{k}={labels[k]}" for k in sorted(labels)))
            self.transition(labels, "firing", step, when)
        for key, record in list(self._firing.items()):
            if key not in keys:
                self.transition(record.labels, "resolved", step, when)

    def firing(self) -> list[AlertRecord]:
        return list(self._firing.values())

    def set_pages(self, delivered: list[dict]) -> None:
        self.pages = [
            PageRecord(receiver=a["receiver"], alertname=a["labels"].get("alertname", "?"), status=a["status"],
                       labels=a["labels"], time=a["received"])
            for a in delivered
        ]
