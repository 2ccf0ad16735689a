"""Real Prometheus, Alertmanager and aggregator processes for the tests, on loopback and free ports,
built and run exactly as the demo runs them (`gradwatch.demo.stack`, configs derived from deploy/),
plus the webhook receiver that plays the pager."""

from __future__ import annotations

import json
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from conftest import free_port
from gradwatch.demo import stack
from gradwatch.demo.processes import Child
from gradwatch.demo.stack import Pager  # noqa: F401  (the webhook receiver that plays the pager)
from promtool_cases import require

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def http_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def http_text(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def prometheus(tmp: Path, targets: list[str], port: Optional[int] = None, rule_file: Optional[Path] = None) -> Child:
    """deploy/prometheus/prometheus.yml as the demo runs it (1 s scrape), scraping `targets`, loading
    `rule_file` (default: deploy's exported rules)."""
    port = port or free_port()
    path = tmp / f"prometheus-{port}.yml"
    path.write_text(yaml.safe_dump(stack.prometheus_config(rule_file or DEPLOY / "prometheus" / "rules" / "gradwatch.rules.yml", targets)))
    return stack.prometheus_child(require("prometheus"), path, tmp / f"tsdb-{port}", port, tmp / f"prometheus-{port}.log")


def alertmanager(tmp: Path, webhook_url: str, port: Optional[int] = None) -> Child:
    """deploy/alertmanager/alertmanager.yml as the demo runs it: every receiver at the test's webhook."""
    port = port or free_port()
    path = tmp / f"alertmanager-{port}.yml"
    path.write_text(yaml.safe_dump(stack.alertmanager_config(webhook_url)))
    return stack.alertmanager_child(require("prometheus-alertmanager"), path, tmp / f"am-{port}", port, tmp / f"alertmanager-{port}.log")


def aggregator(tmp: Path, prometheus_url: str, alertmanager_url: str, rules: Optional[Path], state: Path, port: Optional[int] = None,
               token: Optional[str] = None) -> Child:
    port = port or free_port()
    return stack.aggregator_child(["--prometheus-url", prometheus_url, "--alertmanager-url", alertmanager_url], state, port,
                                  tmp / f"aggregator-{port}.log", rules, token)


@contextmanager
def running(*processes: Child) -> Iterator[None]:
    started = []
    try:
        for p in processes:
            started.append(p.start())
        yield
    finally:
        for p in reversed(started):
            p.stop()
