"""The demo's terminal view: one panel that updates in place (rich) on a terminal, or a progress line
every few steps plus one line per alert, command or page when the output is a file or a pipe."""

from __future__ import annotations

import math
from typing import Optional

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .summary import RunLog, by_alertname, where


def _num(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def render(log: RunLog, total_steps: int, location: str) -> Panel:
    last = log.last_step or {}
    step = last.get("step", -1) + 1
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    progress = Table.grid(padding=(0, 1))
    progress.add_row(ProgressBar(total=total_steps, completed=step, width=40), Text(f"{step}/{total_steps}"))
    table.add_row("step", progress)
    table.add_row("loss", _num(last.get("loss")))
    bound = last.get("clip_bound")
    table.add_row("grad norm", _num(last.get("grad_norm")) + (f"   (guard bound {_num(bound)})" if bound is not None else ""))
    worst = last.get("worst_layer")
    table.add_row("worst layer", worst if worst is not None else "-")
    table.add_row("guard", f"{len(log.guard.skipped_steps)} steps skipped, {len(log.guard.clipped_steps)} clipped")
    firing = by_alertname(log.firing())
    alerts = Text()
    for name, group in firing.items():
        severity = group[0].severity
        alerts.append(f"{name} [{severity}] {where(group)} (since step {group[0].step})\n", style="bold red" if severity == "critical" else "yellow")
    table.add_row("alerts firing", alerts if firing else Text("none", style="green"))
    commands = Text("\n".join(f"step {c.step}: {c.kind} {c.value:g} ({c.outcome})" for c in log.commands) or "none")
    table.add_row("commands applied", commands)
    table.add_row("pages delivered", str(len([p for p in log.pages if p.status == "firing"])))
    return Panel(table, title=f"gradwatch demo: {log.scenario}", subtitle=location)


class View:
    """`update()` as often as you like; on a terminal it redraws, elsewhere it prints what is new."""

    def __init__(self, log: RunLog, total_steps: int, location: str, console: Optional[Console] = None) -> None:
        self.log, self.total, self.location = log, total_steps, location
        self.console = console or Console()
        self.live: Optional[Live] = None
        self._printed = {"steps": 0, "alerts": 0, "commands": 0, "pages": 0}

    def __enter__(self) -> "View":
        if self.console.is_terminal:
            self.live = Live(render(self.log, self.total, self.location), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        else:
            self.console.print(f"gradwatch demo: {self.log.scenario} ({self.location})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.update()
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self) -> None:
        if self.live is not None:
            try:
                self.live.update(render(self.log, self.total, self.location))
                return
            except Exception as exc:  # the view is a convenience: never let it stop the run
                self.live.__exit__(None, None, None)
                self.live = None
                self.console.print(f"gradwatch demo: live view failed ({exc!r}); printing progress lines instead")
        log, seen = self.log, self._printed
        new: dict[tuple[str, str], list] = {}
        for alert in log.alerts[seen["alerts"]:]:
            new.setdefault((alert.alertname, alert.state), []).append(alert)
        for (name, state), group in new.items():
            self.console.print(" ".join(part for part in (f"  alert {state}: {name}", where(group), f"at step {group[0].step}") if part))
        for cmd in log.commands[seen["commands"]:]:
            self.console.print(f"  command {cmd.outcome} on every rank at step {cmd.step}: {cmd.kind} {cmd.value:g}")
        for page in log.pages[seen["pages"]:]:
            self.console.print(f"  page delivered to {page.receiver}: {page.alertname} ({page.status})")
        for event in log.steps[seen["steps"]:]:
            if event["step"] % 10 == 0:
                self.console.print(f"  step {event['step']:4d}/{self.total}  loss {_num(event.get('loss'))}  "
                                   f"grad norm {_num(event.get('grad_norm'))}  worst layer {event.get('worst_layer')}")
        seen.update(steps=len(log.steps), alerts=len(log.alerts), commands=len(log.commands), pages=len(log.pages))
