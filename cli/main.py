"""`gradwatch`: the command line.

    gradwatch rules export [--rules FILE] [-o OUT] [--format rulefile|prometheusrule]
                                                     Prometheus rule file (or PrometheusRule) from the specs
    gradwatch rules check FILE                       validate a rules YAML file
    gradwatch aggregator [--rules FILE] [...]        run the aggregator service
    gradwatch signal --job NAME scale-lr 0.5 --reason "..."   send a command to a job's ranks
    gradwatch dashboards export [-o DIR] [--check]   Grafana dashboard JSON (--check: fail if stale)
    gradwatch dashboards push --grafana-url URL [--token T]   upload them to Grafana
    gradwatch run [--job J] [--auto-attach] [...] -- torchrun ... train.py   train with the agent configured
    gradwatch demo [--scenario exploding|vanishing|nan|dead-relu|healthy]   the main job: see docs/demo.md

Imports only argparse, pydantic and the rule specs up front, so `gradwatch aggregator` runs without
torch (the aggregator image); each sub-command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from ..aggregator.rules import RuleFileError, export_text, load_rules
from ..aggregator.rules.rulefile import FORMATS


def _rules_export(args: argparse.Namespace) -> int:
    text = export_text(load_rules(args.rules), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return 0


def _rules_check(args: argparse.Namespace) -> int:
    ruleset = load_rules(args.file)
    print(f"{args.file}: OK ({len(ruleset.enabled())} rules enabled)")
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    import uvicorn

    from ..aggregator.service.app import create_app
    from ..aggregator.service.config import AggregatorSettings

    overrides = {k: v for k, v in vars(args).items() if k in AggregatorSettings.model_fields and v is not None}
    settings = AggregatorSettings(**overrides)
    ruleset = load_rules(settings.rules)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per query
    uvicorn.run(create_app(settings, ruleset), host=settings.host, port=settings.port, log_level="warning")
    return 0


def _signal(args: argparse.Namespace) -> int:
    """Validate locally (a clear error before any request), then POST through the aggregator's API."""
    import httpx
    from pydantic import TypeAdapter

    from ..wire.commands import CommandSpec

    kind = args.kind.replace("-", "_")
    body: dict = {"kind": kind, "reason": args.reason or "", "ttl_s": args.ttl}
    if kind in ("set_clip_norm", "scale_lr", "skip_steps"):
        if args.value is None:
            print(f"gradwatch: {args.kind} needs a value", file=sys.stderr)
            return 2
        body[{"set_clip_norm": "max_norm", "scale_lr": "factor", "skip_steps": "n"}[kind]] = args.value
    TypeAdapter(CommandSpec).validate_python(body)
    token = os.environ.get("GRADWATCH_AGGREGATOR_TOKEN")
    if not token:
        print("gradwatch: set GRADWATCH_AGGREGATOR_TOKEN to the aggregator's token", file=sys.stderr)
        return 2
    url = args.aggregator_url.rstrip("/") + f"/api/v1/jobs/{args.job}/commands"  # a "/" in a job name is fine: {job:path}
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"gradwatch: aggregator unreachable at {args.aggregator_url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 201:
        print(f"gradwatch: refused ({response.status_code}): {response.text}", file=sys.stderr)
        return 1
    cmd = response.json()
    print(f"{cmd['id']} {kind} queued for {args.job} (expires in {args.ttl} s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from gradwatch.agent.integrations.launch import run  # imports torch: only for this sub-command

    return run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradwatch", description="gradwatch: training-health rules and the aggregator service")
    sub = p.add_subparsers(dest="command", required=True)

    rules = sub.add_parser("rules", help="rule specs: export or check").add_subparsers(dest="rules_command", required=True)
    export = rules.add_parser("export", help="write the Prometheus rule file")
    export.add_argument("--rules", type=Path, help="rules YAML overriding the defaults")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument("--format", choices=sorted(FORMATS), default="rulefile",
                        help="rulefile: Prometheus rule file; prometheusrule: Kubernetes PrometheusRule (Prometheus Operator)")
    export.set_defaults(run=_rules_export, extra="aggregator")
    check = rules.add_parser("check", help="validate a rules YAML file")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_rules_check, extra="aggregator")

    agg = sub.add_parser("aggregator", help="evaluate rules against Prometheus and page through Alertmanager")
    agg.add_argument("--rules", type=Path)
    agg.add_argument("--prometheus-url", dest="prometheus_url")
    agg.add_argument("--alertmanager-url", dest="alertmanager_url", help="`none`: no paging (alerts in the API only)")
    agg.add_argument("--scrape", action="append", metavar="URL",
                     help="no Prometheus: evaluate over this agent's /metrics directly (repeatable)")
    agg.add_argument("--state", type=Path, help="SQLite state file")
    agg.add_argument("--host")
    agg.add_argument("--port", type=int)
    agg.add_argument("--eval-interval", dest="eval_interval")
    agg.add_argument("--resend-interval", dest="resend_interval")
    agg.add_argument("--max-backoff", dest="max_backoff")
    agg.add_argument("--external-url", dest="external_url")
    agg.set_defaults(run=_aggregator, extra="aggregator")

    sig = sub.add_parser("signal", help="send a remediation command to every rank of a job")
    sig.add_argument("--job", required=True)
    sig.add_argument("kind", choices=["set-clip-norm", "scale-lr", "skip-steps", "halt", "reset", "dump-stacks"])
    sig.add_argument("value", nargs="?", type=float, help="max norm, LR factor in (0, 1], or number of steps")
    sig.add_argument("--reason", help="kept in the audit log (required for halt)")
    sig.add_argument("--ttl", type=int, default=600, help="seconds before an unapplied command is dropped")
    sig.add_argument("--aggregator-url", default=os.environ.get("GRADWATCH_AGGREGATOR_URL", "http://127.0.0.1:9095"))
    sig.set_defaults(run=_signal, extra="aggregator")

    run = sub.add_parser("run", help="run a training command with the agent configured on every rank (GRADWATCH_* env)")
    run.add_argument("--job", help="job name, the `job` label of every series")
    run.add_argument("--aggregator", dest="aggregator_url", metavar="URL", help="take commands from it (token: GRADWATCH_AGGREGATOR_TOKEN)")
    run.add_argument("--mode", choices=["observe", "guard", "off"])
    run.add_argument("--metrics-port", dest="metrics_port", type=int, help="rank 0's metrics port (0: a free one)")
    run.add_argument("--auto-attach", dest="auto_attach", action="store_true",
                     help="instrument an unmodified script: its DDP/FSDP model and optimizer (docs/integrations.md)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    run.set_defaults(run=_run, extra="agent")

    from gradwatch.demo.cli import add_arguments as add_demo_arguments, run as run_demo  # argparse only; torch loads on use

    demo = sub.add_parser("demo", help="a real 2-rank training job with a fault, the full stack, a live view and a summary")
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo, extra="demo")

    from gradwatch.dashboards.cli import add_parser as add_dashboards  # argparse only; the Grafana SDK loads on use

    add_dashboards(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except RuleFileError as exc:
        print(f"gradwatch: invalid rules:\n{exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"gradwatch: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # each sub-command's dependencies are an extra; say which one
        print(f"gradwatch: {exc.name or exc} is not installed: pip install 'gradwatch[{args.extra}]'", file=sys.stderr)
        return 2

