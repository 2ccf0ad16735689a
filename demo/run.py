"""`gradwatch demo`: start the stack (or say why not), run the training job, follow it live, and
summarise it - then stop everything it started, however it ends.

    full stack   Prometheus + Alertmanager + the aggregator (rules, paging, commands), when the
                 binaries are installed; the agent runs in guard mode and takes the aggregator's commands.
    embedded     no Prometheus: the agent's guard, and the aggregator reading rank 0's /metrics
                 directly (`gradwatch aggregator --scrape`): the same rules and commands, no pages.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from . import plots, stack as stack_mod
from .catalog import DESCRIPTIONS, EXPECTED_ALERTS
from .events import EventReader
from .live import View
from .processes import Child, Children, Interrupted, raise_on_termination
from .summary import RunLog, Summary, by_alertname, finite, where

POLL_S = 0.25
PAGE_WAIT_S = 8.0  # after the job: how long to wait for Alertmanager to deliver what already fired


@dataclass
class Options:
    scenario: str = "exploding"
    steps: int = 120
    seconds_per_step: float = 0.25
    stack: str = "auto"  # auto | full | embedded
    out: Path = Path("gradwatch-demo")
    summary: Optional[Path] = None
    job: Optional[str] = None
    nproc: int = 2
    metrics_port: Optional[int] = None


class DemoError(Exception):
    """A reason the demo cannot run, said in one line."""


def _choose_stack(requested: str, console: Console) -> Optional[tuple[str, str]]:
    binaries = stack_mod.find_binaries()
    if requested == "embedded":
        return None
    if binaries is None:
        if requested == "full":
            raise DemoError(f"--stack full needs prometheus and prometheus-alertmanager on PATH: {stack_mod.INSTALL_HINT}")
        console.print("[yellow]Prometheus/Alertmanager not found: running on the embedded default (the agent's guard, and the "
                      "aggregator reading rank 0's metrics directly: alerts and commands, no pages). "
                      f"For the full stack: {stack_mod.INSTALL_HINT}[/]")
    return binaries


def _firing_from_aggregator(url: str, job: str) -> Optional[list[dict[str, str]]]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/alerts?job={urllib.parse.quote(job)}", timeout=1) as response:
            alerts = json.loads(response.read())["jobs"].get(job, [])
    except (OSError, ValueError, KeyError):
        return None  # not up yet, or busy: the next poll catches up
    return [a["labels"] for a in alerts if a["state"] == "firing"]


def run(options: Options, console: Optional[Console] = None,
        before_teardown: Optional[Callable[[Optional[stack_mod.Stack], RunLog], None]] = None) -> Summary:
    """Run the demo; `before_teardown(stack, log)` runs while the stack is still up (tests query it)."""
    console = console or Console()
    started = time.time()
    job = options.job or f"demo-{options.scenario}"
    binaries = _choose_stack(options.stack, console)
    workdir = (options.out / "run").resolve()
    shutil.rmtree(workdir, ignore_errors=True)  # a rerun must not inherit the last run's alerts, commands, pages
    workdir.mkdir(parents=True)
    events = workdir / "events.jsonl"
    log = RunLog(options.scenario, job)
    children = Children()
    raise_on_termination()
    stack: Optional[stack_mod.Stack] = None
    exit_code, interrupted = -1, False
    metrics_port = options.metrics_port or stack_mod.free_port()
    reader = EventReader(events)
    with as_file(files("gradwatch.demo") / "rules.yaml") as rules:
        try:
            try:
                stack = (stack_mod.start(children, workdir, binaries, rules, metrics_port) if binaries is not None
                         else stack_mod.start_embedded(children, workdir, rules, metrics_port))
            except RuntimeError as exc:  # a server that would not start: its log says why
                raise DemoError(f"the stack did not start: {exc}") from None
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={options.nproc}",
                   "-m", "gradwatch.demo.worker", "--scenario", options.scenario, "--steps", str(options.steps),
                   "--seconds-per-step", str(options.seconds_per_step), "--events", str(events), "--job", job,
                   "--metrics-port", str(metrics_port)]
            cmd += ["--aggregator-url", stack.aggregator_url, "--linger", "2"]
            training = children.start(Child("training job", cmd, workdir / "train.log",
                                            env={"OMP_NUM_THREADS": "1", "GRADWATCH_AGGREGATOR_TOKEN": stack.token}))
            where = (f"full stack: Prometheus {stack.prometheus_url}, aggregator {stack.aggregator_url}" if stack.full
                     else f"embedded: guard + aggregator {stack.aggregator_url} reading rank 0 directly") + f"; logs in {workdir}"
            console.print(f"[bold]{options.scenario}[/]: {DESCRIPTIONS[options.scenario]}")
            with View(log, options.steps, where, console) as view:
                while True:
                    done = training.poll() is not None
                    for event in reader.read():
                        log.add_event(event)
                    firing = _firing_from_aggregator(stack.aggregator_url, job)
                    if firing is not None:
                        log.active(firing, time.time())
                    if stack.pager is not None:
                        log.set_pages(stack.pager.alerts())
                    view.update()
                    if done:
                        break
                    time.sleep(POLL_S)
                exit_code = training.poll()  # type: ignore[assignment]
                if stack.pager is not None:  # let Alertmanager deliver what already fired
                    deadline = time.time() + PAGE_WAIT_S
                    fired = {a.alertname for a in log.alerts if a.state == "firing"}
                    while time.time() < deadline and not fired <= {p.alertname for p in log.pages}:
                        time.sleep(POLL_S)
                        log.set_pages(stack.pager.alerts())
                    view.update()
            if exit_code != 0 and not (log.end or {}).get("halted"):
                console.print(f"[red]the training job exited with code {exit_code}; its log ({workdir / 'train.log'}) ends:[/]\n"
                              + training.tail())
            if before_teardown is not None:
                before_teardown(stack, log)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
            console.print("[yellow]stopped: shutting down everything the demo started[/]")
        finally:
            children.stop_all()
            if stack is not None:
                stack.close()
    for event in reader.read():  # what the job wrote before it stopped (an interrupted run too)
        log.add_event(event)
    return _finish(options, log, binaries is not None, exit_code, interrupted, started, console)


def _finish(options: Options, log: RunLog, full: bool, exit_code: int, interrupted: bool, started: float, console: Console) -> Summary:
    written = [str(p) for p in plots.save(log, options.out)] if log.steps else []
    end = log.end or {}
    last = log.last_step or {}
    summary = Summary(
        scenario=options.scenario, stack="full" if full else "embedded", job=log.job,
        world_size=(log.start or {}).get("world_size", options.nproc),
        steps=end.get("steps", last.get("step", -1) + 1), final_loss=finite(end.get("final_loss", last.get("loss"))),
        exit_code=exit_code, halted=bool(end.get("halted")), interrupted=interrupted, nan_origin=end.get("nan_origin"),
        expected_alerts=list(EXPECTED_ALERTS[options.scenario]), alerts=log.alerts, commands=log.commands, guard=log.guard,
        pages=log.pages, plots=written, duration_s=round(time.time() - started, 2),
    )
    if options.summary is not None:
        options.summary.parent.mkdir(parents=True, exist_ok=True)
        options.summary.write_text(summary.model_dump_json(indent=2), encoding="utf-8")
    _print(summary, options, console)
    return summary


def _print(summary: Summary, options: Options, console: Console) -> None:
    table = Table(title=f"gradwatch demo: {summary.scenario} ({summary.stack})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{summary.steps} of {options.steps}" + (" (halted by a command)" if summary.halted else ""))
    table.add_row("final loss", f"{summary.final_loss:.4g}" if summary.final_loss is not None else "non-finite or none")
    if summary.nan_origin:
        o = summary.nan_origin
        table.add_row("first NaN", f"step {o['step']}, {o['kind']} of layer {o['layer']}, rank(s) {o['ranks'] or 'all'}")
    table.add_row("alerts fired", "\n".join(f"step {group[0].step}: {name} {where(group)}"
                                             for name, group in by_alertname(summary.alerts).items()) or "none")
    missing = set(summary.expected_alerts) - {a.alertname for a in summary.alerts}
    if missing:
        table.add_row("[red]expected, not raised[/]", ", ".join(sorted(missing)))
    table.add_row("commands applied", "\n".join(f"step {c.step}: {c.kind} {c.value:g} ({c.outcome})" for c in summary.commands) or "none")
    table.add_row("guard", f"skipped steps {summary.guard.skipped_steps or 'none'}, clipped {len(summary.guard.clipped_steps)} steps")
    if summary.stack == "full":
        pages = Counter((p.receiver, p.alertname, p.status) for p in summary.pages)
        table.add_row("pages delivered", "\n".join(f"{receiver}: {name} ({status})" + (f" x{n}" if n > 1 else "")
                                                    for (receiver, name, status), n in pages.items()) or "none")
    table.add_row("plots", "\n".join(summary.plots) or "none")
    if options.summary is not None:
        table.add_row("summary", str(options.summary))
    console.print(table)


def main(args: object) -> int:
    """Entry point of `gradwatch demo` (arguments: gradwatch.demo.cli)."""
    options = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    console = Console()
    try:
        summary = run(options, console)
    except DemoError as exc:
        console.print(f"[red]gradwatch demo: {exc}[/]")
        return 2
    if summary.interrupted:
        return 130
    return 0 if summary.exit_code == 0 or summary.halted else 1
