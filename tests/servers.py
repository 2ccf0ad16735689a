"""Real Prometheus, Alertmanager and aggregator processes for the tests, on loopback and free ports
with temporary configs derived from deploy/, plus the webhook receiver that plays the pager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from conftest import free_port
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


class Process:
    def __init__(self, name: str, cmd: list[str], log: Path, ready_url: Optional[str], env: Optional[dict] = None) -> None:
        self.name, self.cmd, self.log_path, self.ready_url, self.env = name, cmd, log, ready_url, env
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30) -> "Process":
        self._log = self.log_path.open("ab")
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if self.ready_url:
            def ready() -> bool:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log()[-2000:]}")
                with urllib.request.urlopen(self.ready_url, timeout=2) as r:
                    return r.status == 200
            try:
                wait_for(ready, timeout, f"{self.name} ready")
            except Exception:
                self.stop()
                raise AssertionError(f"{self.name} did not start: {self.log()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def prometheus(tmp: Path, targets: list[str], port: Optional[int] = None, rule_file: Optional[Path] = None) -> Process:
    """deploy/prometheus/prometheus.yml with a 1 s scrape, the given agent targets and loopback ports."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rule_file or DEPLOY / "prometheus" / "rules" / "gradwatch.rules.yml")]
    agents = next(c for c in config["scrape_configs"] if c["job_name"] == "gradwatch-agents")
    assert agents["honor_labels"] is True
    agents["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [agents]
    port = port or free_port()
    path = tmp / f"prometheus-{port}.yml"
    path.write_text(yaml.safe_dump(config))
    return Process("prometheus", [
        require("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={tmp / f'tsdb-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], tmp / f"prometheus-{port}.log", f"http://127.0.0.1:{port}/-/ready")


def alertmanager(tmp: Path, webhook_url: str, port: Optional[int] = None) -> Process:
    """deploy/alertmanager/alertmanager.yml with every receiver pointed at the test's webhook and
    second-scale grouping so a test does not wait minutes."""
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    config["route"].update(group_wait="0s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url.rstrip("/") + "/" + receiver["name"]
    port = port or free_port()
    path = tmp / f"alertmanager-{port}.yml"
    path.write_text(yaml.safe_dump(config))
    return Process("alertmanager", [
        require("prometheus-alertmanager"), f"--config.file={path}", f"--storage.path={tmp / f'am-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn",
    ], tmp / f"alertmanager-{port}.log", f"http://127.0.0.1:{port}/-/ready")


def aggregator(tmp: Path, prometheus_url: str, alertmanager_url: str, rules: Optional[Path], state: Path, port: Optional[int] = None,
               token: Optional[str] = None) -> Process:
    port = port or free_port()
    cmd = [sys.executable, "-m", "gradwatch.cli", "aggregator", "--prometheus-url", prometheus_url,
           "--alertmanager-url", alertmanager_url, "--state", str(state), "--port", str(port),
           "--eval-interval", "1s", "--resend-interval", "5s", "--max-backoff", "2s"]
    if rules is not None:
        cmd += ["--rules", str(rules)]
    env = {"GRADWATCH_AGGREGATOR_TOKEN": token} if token else None
    proc = Process("aggregator", cmd, tmp / f"aggregator-{port}.log", f"http://127.0.0.1:{port}/healthz", env=env)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


@contextmanager
def running(*processes: Process) -> Iterator[None]:
    started = []
    try:
        for p in processes:
            started.append(p.start())
        yield
    finally:
        for p in reversed(started):
            p.stop()
