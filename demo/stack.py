"""The full monitoring stack on one machine, for the demo: Prometheus scraping the job's rank 0 and
the aggregator, Alertmanager routing critical alerts to a pager and the rest to chat, the aggregator
evaluating gradwatch's rules and sending commands, and a webhook receiver standing in for the pager
and the chat room (it records what a human would have been sent).

Everything listens on loopback on free ports, with configs written to the demo's work directory; the
processes are `Children`, so they are stopped with the demo.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import yaml

from ..aggregator.rules import export_text, load_rules
from .processes import Children

INSTALL_HINT = "sudo apt-get install -y prometheus prometheus-alertmanager"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binaries() -> Optional[tuple[str, str]]:
    """(prometheus, alertmanager) from PATH - Debian names Alertmanager `prometheus-alertmanager`."""
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    return (prometheus, alertmanager) if prometheus and alertmanager else None


class Pager:
    """The webhook receiver Alertmanager notifies (receiver name = URL path): every notification,
    with its arrival time."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with pager.lock:
                    pager.notifications.append({"received": time.time(), "receiver": self.path.strip("/"), **body})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, name="gradwatch-demo-pager", daemon=True).start()

    def alerts(self, status: Optional[str] = None, **labels: str) -> list[dict[str, Any]]:
        """Every alert delivered (with its notification's arrival time and receiver) matching `status` and `labels`."""
        with self.lock:
            return [
                {**a, "received": n["received"], "receiver": n["receiver"]}
                for n in self.notifications for a in n["alerts"]
                if (status is None or a["status"] == status) and all(a["labels"].get(k) == v for k, v in labels.items())
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    aggregator_url: str
    token: str
    prometheus_url: Optional[str] = None  # None: the embedded stack (the aggregator scrapes the agent)
    alertmanager_url: Optional[str] = None
    pager: Optional[Pager] = None

    @property
    def full(self) -> bool:
        return self.prometheus_url is not None

    def close(self) -> None:
        if self.pager is not None:
            self.pager.close()


def prometheus_config(rule_file: Path, metrics_port: int, aggregator_port: int) -> dict:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            # The agent labels every series with the training job's name: keep it (honor_labels).
            {"job_name": "gradwatch-agents", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            {"job_name": "gradwatch-aggregator", "static_configs": [{"targets": [f"127.0.0.1:{aggregator_port}"]}]},
        ],
    }


def alertmanager_config(pager_url: str) -> dict:
    """deploy/alertmanager's routing (critical pages, the rest goes to chat) with second-scale grouping."""
    hook = lambda name: {"name": name, "webhook_configs": [{"url": f"{pager_url}/{name}", "send_resolved": True}]}  # noqa: E731
    return {
        "route": {
            "receiver": "training-chat", "group_by": ["alertname", "job"],
            "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h",
            "routes": [{"receiver": "training-pager", "matchers": ['severity="critical"']}],
        },
        "receivers": [hook("training-pager"), hook("training-chat")],
    }


def _aggregator(children: Children, workdir: Path, rules: Path, port: int, token: str, source: list[str]) -> None:
    children.start("aggregator", [
        sys.executable, "-m", "gradwatch.cli", "aggregator", "--rules", str(rules), *source,
        "--state", str(workdir / "aggregator.sqlite"), "--port", str(port),
        "--eval-interval", "1s", "--resend-interval", "5s", "--max-backoff", "2s",
    ], workdir / "aggregator.log", env={"GRADWATCH_AGGREGATOR_TOKEN": token}).wait_ready(f"http://127.0.0.1:{port}/healthz")


def start_embedded(children: Children, workdir: Path, rules: Path, metrics_port: int) -> Stack:
    """No Prometheus: the aggregator reads rank 0's /metrics itself (`--scrape`), evaluates the same
    rules in process and sends the same commands; no Alertmanager, so nothing is paged."""
    port, token = free_port(), secrets.token_urlsafe(24)
    _aggregator(children, workdir, rules, port, token,
                ["--scrape", f"http://127.0.0.1:{metrics_port}/metrics", "--alertmanager-url", "none"])
    return Stack(f"http://127.0.0.1:{port}", token)


def start(children: Children, workdir: Path, binaries: tuple[str, str], rules: Path, metrics_port: int) -> Stack:
    """Start the pager, Alertmanager, Prometheus and the aggregator; return once all answer."""
    prometheus_bin, alertmanager_bin = binaries
    prom_port, am_port, agg_port = free_port(), free_port(), free_port()
    pager = Pager()
    rule_file = workdir / "gradwatch.rules.yml"
    rule_file.write_text(export_text(load_rules(rules)), encoding="utf-8")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(rule_file, metrics_port, agg_port)))
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(pager.url)))
    stack = Stack(f"http://127.0.0.1:{agg_port}", secrets.token_urlsafe(24), f"http://127.0.0.1:{prom_port}",
                  f"http://127.0.0.1:{am_port}", pager)
    am = children.start("alertmanager", [
        alertmanager_bin, f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={workdir / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=warn",
    ], workdir / "alertmanager.log")
    prom = children.start("prometheus", [
        prometheus_bin, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'prometheus'}",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
    ], workdir / "prometheus.log")
    am.wait_ready(f"{stack.alertmanager_url}/-/ready")
    prom.wait_ready(f"{stack.prometheus_url}/-/ready")
    _aggregator(children, workdir, rules, agg_port, stack.token,
                ["--prometheus-url", str(stack.prometheus_url), "--alertmanager-url", str(stack.alertmanager_url)])
    return stack
