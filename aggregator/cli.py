"""`gradwatch`: the command line.

    gradwatch rules export [--rules FILE] [-o OUT]   Prometheus rule file from the specs
    gradwatch rules check FILE                       validate a rules YAML file
    gradwatch aggregator [--rules FILE] [...]        run the aggregator service
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from .rules import RuleFileError, export_text, load_rules


def _rules_export(args: argparse.Namespace) -> int:
    text = export_text(load_rules(args.rules))
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

    from .service.app import create_app
    from .service.config import AggregatorSettings

    overrides = {k: v for k, v in vars(args).items() if k in AggregatorSettings.model_fields and v is not None}
    settings = AggregatorSettings(**overrides)
    ruleset = load_rules(settings.rules)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings, ruleset), host=settings.host, port=settings.port, log_level="warning")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradwatch", description="gradwatch: training-health rules and the aggregator service")
    sub = p.add_subparsers(dest="command", required=True)

    rules = sub.add_parser("rules", help="rule specs: export or check").add_subparsers(dest="rules_command", required=True)
    export = rules.add_parser("export", help="write the Prometheus rule file")
    export.add_argument("--rules", type=Path, help="rules YAML overriding the defaults")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.set_defaults(run=_rules_export)
    check = rules.add_parser("check", help="validate a rules YAML file")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_rules_check)

    agg = sub.add_parser("aggregator", help="evaluate rules against Prometheus and page through Alertmanager")
    agg.add_argument("--rules", type=Path)
    agg.add_argument("--prometheus-url", dest="prometheus_url")
    agg.add_argument("--alertmanager-url", dest="alertmanager_url")
    agg.add_argument("--state", type=Path, help="SQLite state file")
    agg.add_argument("--host")
    agg.add_argument("--port", type=int)
    agg.add_argument("--eval-interval", dest="eval_interval")
    agg.add_argument("--resend-interval", dest="resend_interval")
    agg.add_argument("--max-backoff", dest="max_backoff")
    agg.add_argument("--external-url", dest="external_url")
    agg.set_defaults(run=_aggregator)
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


if __name__ == "__main__":
    sys.exit(main())
