"""Rank 0's link to the aggregator: polls this job's pending commands and posts acknowledgements on
a daemon thread, with timeouts. The training step only takes what has already arrived (never
waits); if the aggregator is down, training goes on and this says so once (and once when it is back).
Standard library only: the agent installs without the service's dependencies."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

from ..aggregator.commands import Ack, Command

log = logging.getLogger("gradwatch.agent")


class CommandClient:
    def __init__(self, url: str, token: str, job: str, poll_s: float, timeout_s: float = 2.0) -> None:
        self.base, self.job, self.poll_s, self.timeout_s = url.rstrip("/"), job, poll_s, timeout_s
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._lock = threading.Lock()
        self._inbox: "collections.deque[Command]" = collections.deque()
        self._acks: "collections.deque[tuple[str, Ack]]" = collections.deque()
        self._seen: set[str] = set()
        self._down = False
        self.reachable: Optional[bool] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-commands", daemon=True)
        self._thread.start()

    # ---- training thread -------------------------------------------------------------------------

    def take(self) -> Optional[Command]:
        """The oldest command not yet handed out; expired ones are acknowledged as such and skipped."""
        with self._lock:
            while self._inbox:
                cmd = self._inbox.popleft()
                if cmd.expires_at >= time.time():
                    return cmd
                self._acks.append((cmd.id, Ack(step=0, outcome="expired", detail="expired before it could be applied")))
        return None

    def ack(self, command_id: str, step: int, outcome: str = "applied", detail: str = "") -> None:
        with self._lock:
            self._acks.append((command_id, Ack(step=step, outcome=outcome, detail=detail)))  # type: ignore[arg-type]

    def close(self, timeout: float = 5.0) -> None:
        """Deliver the acknowledgements still queued (bounded), then stop."""
        deadline = time.time() + timeout
        while self._acks and time.time() < deadline and self.reachable is not False:
            self._send_acks()
        self._stop.set()
        self._thread.join(timeout=1)

    # ---- background thread -----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self._headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
            return json.loads(response.read() or b"{}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._send_acks()
            try:
                answer = self._request("GET", f"/api/v1/jobs/{self.job}/commands")
                fresh = [Command.model_validate(c) for c in answer.get("commands", [])]
                with self._lock:
                    for cmd in fresh:
                        if cmd.id not in self._seen:  # a replay of an id is never applied twice
                            self._seen.add(cmd.id)
                            self._inbox.append(cmd)
                self._up()
            except Exception as exc:  # unreachable, 401, garbage: report once, keep training
                self._failed(exc)
            self._stop.wait(self.poll_s)

    def _send_acks(self) -> None:
        while True:
            with self._lock:
                if not self._acks:
                    return
                command_id, ack = self._acks[0]
            try:
                self._request("POST", f"/api/v1/commands/{command_id}/ack", ack.model_dump())
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: the aggregator forgot it; nothing to retry
                    self._failed(exc)
                    return
            except Exception as exc:
                self._failed(exc)
                return
            with self._lock:
                self._acks.popleft()

    def _failed(self, exc: BaseException) -> None:
        self.reachable = False
        if not self._down:
            self._down = True
            log.error("gradwatch: aggregator at %s not usable (%r); training goes on, commands wait", self.base, exc)

    def _up(self) -> None:
        self.reachable = True
        if self._down:
            self._down = False
            log.warning("gradwatch: aggregator at %s reachable again", self.base)
