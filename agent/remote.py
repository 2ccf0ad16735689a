"""Rank 0's link to the aggregator: polls this job's pending commands and posts acknowledgements on
a daemon thread, with timeouts. The training step only takes what has already arrived (never
waits); if the aggregator is down, training goes on and this says so once (and once when it is back).
Out-of-band commands (dump_stacks) are applied on this thread at once, since a hung job steps no more.
Standard library only: the agent installs without the service's dependencies."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

from ..wire.commands import OUT_OF_BAND, Ack, Command

log = logging.getLogger("gradwatch.agent")


class CommandClient:
    def __init__(self, url: str, token: str, job: str, poll_s: float, timeout_s: float = 2.0,
                 out_of_band: Optional[Callable[[Command], tuple[int, str]]] = None) -> None:
        """`out_of_band(command) -> (step, detail)` applies an OUT_OF_BAND command on this thread."""
        self.base, self.job, self.poll_s, self.timeout_s = url.rstrip("/"), job, poll_s, timeout_s
        self._out_of_band = out_of_band
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._lock = threading.Lock()
        self._inbox: "collections.deque[tuple[Command, float]]" = collections.deque()  # (command, monotonic deadline)
        self._acks: "collections.deque[tuple[str, Ack]]" = collections.deque()
        self._seen: set[str] = set()
        self._down = False
        self.reachable: Optional[bool] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-commands", daemon=True)
        self._thread.start()

    # ---- training thread -------------------------------------------------------------------------

    def take(self) -> Optional[Command]:
        """The oldest command not yet handed out; expired ones are acknowledged as such and skipped.
        Expiry is judged on this host's monotonic clock from the TTL left when the aggregator served
        it, so clock skew between the hosts does not matter."""
        with self._lock:
            while self._inbox:
                cmd, deadline = self._inbox.popleft()
                if time.monotonic() <= deadline:
                    return cmd
                self._acks.append((cmd.id, Ack(step=0, outcome="expired", detail="expired before it could be applied")))
        return None

    def ack(self, command_id: str, step: int, outcome: str = "applied", detail: str = "") -> None:
        with self._lock:
            self._acks.append((command_id, Ack(step=step, outcome=outcome, detail=detail)))  # type: ignore[arg-type]

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling, then deliver the acknowledgements still queued (bounded, one thread)."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 1)
        deadline = time.monotonic() + timeout
        while self._acks and time.monotonic() < deadline:
            if not self._send_acks():
                time.sleep(0.2)

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
                answer = self._request("GET", f"/api/v1/jobs/{urllib.parse.quote(self.job, safe='')}/commands")
                served_at, received = float(answer.get("now", time.time())), time.monotonic()
                for raw in answer.get("commands", []):
                    self._receive(raw, served_at, received)
                self._up()
            except Exception as exc:  # unreachable, 401, garbage: report once, keep training
                self._failed(exc)
            self._stop.wait(self.poll_s)

    def _receive(self, raw: dict, served_at: float, received: float) -> None:
        """One served command, validated on its own: a malformed one is acknowledged as rejected
        instead of blocking the ones after it."""
        command_id = str(raw.get("id", ""))
        if not command_id or command_id in self._seen:  # a replay of an id is never applied twice
            return
        self._seen.add(command_id)
        try:
            cmd = Command.model_validate(raw)
        except Exception as exc:
            with self._lock:
                self._acks.append((command_id, Ack(step=0, outcome="rejected", detail=f"invalid command: {exc!r}"[:400])))
            return
        if cmd.spec.kind in OUT_OF_BAND:
            self._apply_out_of_band(cmd)
            return
        with self._lock:
            self._inbox.append((cmd, received + (cmd.expires_at - served_at)))

    def _apply_out_of_band(self, cmd: Command) -> None:
        try:
            if self._out_of_band is None:
                raise RuntimeError(f"{cmd.spec.kind} is not supported by this agent")
            step, detail = self._out_of_band(cmd)
            ack = Ack(step=max(step, 0), outcome="applied", detail=detail[:500])
        except Exception as exc:
            ack = Ack(step=0, outcome="rejected", detail=f"{exc!r}"[:500])
        log.warning("gradwatch: command %s %s: %s", cmd.spec.kind, ack.outcome, ack.detail)
        with self._lock:
            self._acks.append((cmd.id, ack))

    def _send_acks(self) -> bool:
        """Post queued acks in order; False if one could not be delivered (it stays queued)."""
        while True:
            with self._lock:
                if not self._acks:
                    return True
                command_id, ack = self._acks.popleft()
            try:
                self._request("POST", f"/api/v1/commands/{command_id}/ack", ack.model_dump())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # the aggregator does not know it: nothing to retry
                    continue
                self._requeue(command_id, ack, exc)
                return False
            except Exception as exc:
                self._requeue(command_id, ack, exc)
                return False

    def _requeue(self, command_id: str, ack: Ack, exc: BaseException) -> None:
        with self._lock:
            self._acks.appendleft((command_id, ack))
        self._failed(exc)

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
