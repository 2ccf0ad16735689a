"""Every process the demo starts, and the one place that stops them all.

Each child runs in a session of its own, so a Ctrl-C in the terminal reaches only the demo, which then
stops the children in order: SIGTERM to the child's whole process group (torchrun and its ranks, or a
server), a grace period, then SIGKILL. `stop_all` runs on normal exit, on Ctrl-C and SIGTERM (turned
into an exception so `finally` blocks run), and at interpreter exit: no orphan is left behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence


class Child:
    """A process with its log file and an optional readiness URL; `start` launches it. Used by the demo
    (through `Children`) and by the tests, so both run their servers the same way."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: Optional[dict[str, str]] = None,
                 url: Optional[str] = None, ready_url: Optional[str] = None) -> None:
        self.name, self.cmd, self.log_path, self.env = name, list(cmd), log, env
        self.url, self.ready_url = url, ready_url  # a server's base URL, and the URL that answers 200 once it serves
        self.proc: Optional[subprocess.Popen] = None
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> "Child":
        """Launch in a session of its own; with a readiness URL, return once it answers 200 (else
        stop it and raise, with its log)."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(self.env or {})}, start_new_session=True)
        if self.ready_url is not None:
            try:
                self.wait_ready(self.ready_url, timeout)
            except Exception:
                self.stop()
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll() if self.proc is not None else None

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        """Poll `url` until it answers 200; a child that exits first, or a timeout, is an error with its log."""
        assert self.proc is not None, f"{self.name} was not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout:.0f} s:\n{self.tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL to the child alone (a crash, as tests need one); `stop` still cleans up after it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the child's process group, then SIGKILL after `grace` seconds - and SIGKILL to
        any descendant still alive: torchrun starts each rank in a session of its own, outside the group."""
        if self.proc is None:
            return
        descendants = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace)
        _signal_group(self.proc.pid, signal.SIGKILL)
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root`, from /proc (Linux); empty where /proc is not readable."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Children:
    """The demo's children, stopped in reverse start order (the training job before the servers)."""

    def __init__(self) -> None:
        self._started: list[Child] = []
        atexit.register(self.stop_all)

    def start(self, child: Child, timeout: float = 30.0) -> Child:
        """Start `child` (and wait for its readiness URL, if any); it is stopped with the others."""
        self._started.append(child)
        return child.start(timeout)

    def stop_all(self) -> None:
        """Stop every child; a second Ctrl-C meanwhile does not cut the shutdown short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            while self._started:
                self._started[-1].stop()
                self._started.pop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the demo; raised in the main thread so cleanup runs."""


def raise_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into an exception (Ctrl-C already raises KeyboardInterrupt)."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
