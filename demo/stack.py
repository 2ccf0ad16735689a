"""The full monitoring stack on one machine, for the demo: Prometheus scraping the job's rank 0 and
the aggregator, Alertmanager routing critical alerts to a pager and the rest to chat, the aggregator
evaluating gradwatch's rules and sending commands, and a webhook receiver standing in for the pager
and the chat room (it records what a human would have been sent).

Everything listens on loopback on free ports, with configs derived from deploy/'s (shipped in the package
as `gradwatch.deploy`) and written to the demo's work directory; the processes are `Children`, so they
are stopped with the demo. The tests start their servers with the same builders.
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
from importlib.resources import files
from typing import Any, Optional, Sequence

import yaml

from ..aggregator.rules import export_text, load_rules
from .processes import Child, Children

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


def deploy_config(name: str) -> dict:
    """One of deploy/'s configs as shipped in the package (`prometheus/prometheus.yml`, `alertmanager/alertmanager.yml`):
    the demo and the tests run what users deploy, changed only where a loopback run must differ."""
    return yaml.safe_load((files("gradwatch.deploy") / name).read_text(encoding="utf-8"))


def prometheus_config(rule_file: Path, agent_targets: Sequence[str], aggregator_target: Optional[str] = None) -> dict:
    """deploy/prometheus/prometheus.yml with 1 s scrape and evaluation, the given rank-0 targets, and the
    aggregator's own metrics when `aggregator_target` is given; its other jobs (file discovery) dropped."""
    config = deploy_config("prometheus/prometheus.yml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rule_file)]
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    config["scrape_configs"] = [{**jobs["gradwatch-agents"], "static_configs": [{"targets": list(agent_targets)}]}]
    if aggregator_target is not None:
        config["scrape_configs"].append({**jobs["gradwatch-aggregator"], "static_configs": [{"targets": [aggregator_target]}]})
    return config


def alertmanager_config(pager_url: str) -> dict:
    """deploy/alertmanager/alertmanager.yml (its routes, receivers and inhibitions) with every webhook
    pointed at `pager_url`/<receiver name> and second-scale grouping, so nobody waits minutes for a page."""
    config = deploy_config("alertmanager/alertmanager.yml")
    config["route"].update(group_wait="0s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{pager_url.rstrip('/')}/{receiver['name']}"
    return config


def prometheus_child(binary: str, config: Path, data: Path, port: int, log: Path) -> Child:
    url = f"http://127.0.0.1:{port}"
    return Child("prometheus", [
        binary, f"--config.file={config}", f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ], log, url=url, ready_url=f"{url}/-/ready")


def alertmanager_child(binary: str, config: Path, data: Path, port: int, log: Path) -> Child:
    url = f"http://127.0.0.1:{port}"
    return Child("alertmanager", [
        binary, f"--config.file={config}", f"--storage.path={data}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=", "--log.level=warn",
    ], log, url=url, ready_url=f"{url}/-/ready")


def aggregator_child(source: Sequence[str], state: Path, port: int, log: Path, rules: Optional[Path] = None,
                     token: Optional[str] = None) -> Child:
    """`gradwatch aggregator` reading `source` (--prometheus-url/--alertmanager-url, or --scrape), with
    second-scale evaluation and retries."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gradwatch.cli", "aggregator", *source, "--state", str(state), "--port", str(port),
           "--eval-interval", "1s", "--resend-interval", "5s", "--max-backoff", "2s"]
    if rules is not None:
        cmd += ["--rules", str(rules)]
    return Child("aggregator", cmd, log, env={"GRADWATCH_AGGREGATOR_TOKEN": token} if token else None,
                 url=url, ready_url=f"{url}/healthz")


def start_embedded(children: Children, workdir: Path, rules: Path, metrics_port: int) -> Stack:
    """No Prometheus: the aggregator reads rank 0's /metrics itself (`--scrape`), evaluates the same
    rules in process and sends the same commands; no Alertmanager, so nothing is paged."""
    token = secrets.token_urlsafe(24)
    aggregator = children.start(aggregator_child(["--scrape", f"http://127.0.0.1:{metrics_port}/metrics", "--alertmanager-url", "none"],
                                                 workdir / "aggregator.sqlite", free_port(), workdir / "aggregator.log", rules, token))
    return Stack(str(aggregator.url), token)


def start(children: Children, workdir: Path, binaries: tuple[str, str], rules: Path, metrics_port: int) -> Stack:
    """Start the pager, Alertmanager, Prometheus and the aggregator; return once all answer."""
    prometheus_bin, alertmanager_bin = binaries
    prom_port, am_port, agg_port = free_port(), free_port(), free_port()
    pager = Pager()
    rule_file = workdir / "gradwatch.rules.yml"
    rule_file.write_text(export_text(load_rules(rules)), encoding="utf-8")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(
        prometheus_config(rule_file, [f"127.0.0.1:{metrics_port}"], f"127.0.0.1:{agg_port}")))
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(pager.url)))
    token = secrets.token_urlsafe(24)
    alertmanager = children.start(alertmanager_child(alertmanager_bin, workdir / "alertmanager.yml", workdir / "alertmanager",
                                                     am_port, workdir / "alertmanager.log"))
    prometheus = children.start(prometheus_child(prometheus_bin, workdir / "prometheus.yml", workdir / "prometheus", prom_port,
                                                 workdir / "prometheus.log"))
    aggregator = children.start(aggregator_child(["--prometheus-url", str(prometheus.url), "--alertmanager-url", str(alertmanager.url)],
                                                 workdir / "aggregator.sqlite", agg_port, workdir / "aggregator.log", rules, token))
    return Stack(str(aggregator.url), token, prometheus.url, alertmanager.url, pager)
