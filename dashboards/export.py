"""Render the dashboards to the JSON Grafana imports, and tell whether the committed copies are stale.

The JSON in json/ is what file provisioning and `gradwatch dashboards push` serve, so it is committed
and a test (and `export --check`) fails when it drifts from the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from . import JSON_DIR, activations, layers, overview, ranks

BUILDERS: dict[str, Callable[[], db.Dashboard]] = {
    f"{m.UID}.json": m.build for m in (overview, layers, activations, ranks)
}


def render() -> dict[str, str]:
    """File name -> JSON text: stable key order and a final newline, so the committed diff is the change."""
    return {
        name: json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, build in BUILDERS.items()
    }


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    return written


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names that are missing or differ from a fresh render, plus stray JSON files nothing generates."""
    fresh = render()
    changed = [n for n, text in fresh.items() if not (directory / n).is_file() or (directory / n).read_text(encoding="utf-8") != text]
    stray = sorted(p.name for p in directory.glob("*.json") if p.name not in fresh) if directory.is_dir() else []
    return changed + stray
