"""`gradwatch dashboards export|push`. Only argparse at import: the aggregator's CLI registers this
sub-command and must keep importing without the Grafana SDK or grafana-client installed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import JSON_DIR


# A checkout is recognised by its dashboards package; there `export` rewrites the committed JSON. The
# installed package's json/ is no default: under a non-editable install it is site-packages.
CHECKOUT_MARKER = Path("dashboards") / "export.py"
CHECKOUT_JSON = Path("dashboards") / "json"


def _output(args: argparse.Namespace) -> Path | None:
    """-o DIR, else ./dashboards/json in a gradwatch checkout, else None (the caller says what to pass)."""
    if args.output is not None:
        return args.output
    return CHECKOUT_JSON if CHECKOUT_MARKER.is_file() else None


def _export(args: argparse.Namespace) -> int:
    output = _output(args)
    if output is None:
        print(f"gradwatch: not in a gradwatch checkout (no ./{CHECKOUT_MARKER}): pass -o DIR, "
              "or run from the repository root to rewrite its dashboards/json", file=sys.stderr)
        return 2
    from . import export

    if args.check:
        stale = export.stale(output)
        if stale:
            print(f"gradwatch: dashboards in {output} are stale: {', '.join(stale)} "
                  f"(run `gradwatch dashboards export -o {output}`)", file=sys.stderr)
            return 1
        print(f"{output}: up to date ({len(export.BUILDERS)} dashboards)")
        return 0
    for path in export.write(output):
        print(path)
    return 0


def _push(args: argparse.Namespace) -> int:
    from .push import PushError, load, push

    if not args.token:
        print("gradwatch: pass --token or set GRAFANA_TOKEN (a Grafana service-account token)", file=sys.stderr)
        return 2
    try:
        for url in push(args.grafana_url, args.token, args.folder, load(args.dir)):
            print(url)
    except PushError as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    dash = sub.add_parser("dashboards", help="Grafana dashboards: export the JSON or push it to Grafana")
    cmds = dash.add_subparsers(dest="dashboards_command", required=True)
    export = cmds.add_parser("export", help="write the dashboards' JSON")
    export.add_argument("-o", "--output", type=Path, default=None,
                        help=f"directory (default: ./{CHECKOUT_JSON} when run from the repository root; required elsewhere)")
    export.add_argument("--check", action="store_true", help="write nothing; exit 1 if the JSON there is stale")
    export.set_defaults(run=_export, extra="dashboards")
    push = cmds.add_parser("push", help="upload the dashboards to Grafana (HTTP API, overwrite by uid)")
    push.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    push.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"), help="service-account token (default: $GRAFANA_TOKEN)")
    push.add_argument("--folder", default="gradwatch", help="Grafana folder, created if missing (default: gradwatch)")
    push.add_argument("--dir", type=Path, default=JSON_DIR, help="dashboard JSON to upload (default: the packaged JSON)")
    push.set_defaults(run=_push, extra="dashboards")
