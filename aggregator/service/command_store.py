"""Commands and their audit trail in SQLite (the aggregator's state file). A command is served to
its job until it is acknowledged or expires; an acknowledged one is never served again, so neither
a restarted aggregator nor a restarted rank applies it twice."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from pydantic import TypeAdapter

from ...wire.commands import Ack, Command, CommandSpec
from .store import connect

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, job TEXT NOT NULL, state TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS commands_job_state ON commands (job, state)",
    "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, job TEXT NOT NULL,"
    " command TEXT, event TEXT NOT NULL, detail TEXT NOT NULL)",
)
_SPEC = TypeAdapter(CommandSpec)


class CommandStore:
    def __init__(self, path: Path) -> None:
        self._db = connect(path, *SCHEMA)
        self._lock = threading.Lock()

    def audit(self, job: str, event: str, detail: dict, command: Optional[str] = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit (ts, job, command, event, detail) VALUES (?, ?, ?, ?, ?)",
                             (time.time(), job, command, event, json.dumps(detail, sort_keys=True)))

    def submit(self, job: str, spec, source: str) -> Command:
        now = time.time()
        cmd = Command(id=uuid.uuid4().hex, job=job, spec=spec, source=source, created_at=now, expires_at=now + spec.ttl_s)
        with self._lock:
            self._db.execute("INSERT INTO commands (id, job, state, body) VALUES (?, ?, ?, ?)", (cmd.id, job, cmd.state, cmd.model_dump_json()))
        self.audit(job, "submitted", {"source": source, **_SPEC.dump_python(spec, mode="json")}, cmd.id)
        return cmd

    def _save(self, cmd: Command) -> None:
        with self._lock:
            self._db.execute("UPDATE commands SET state = ?, body = ? WHERE id = ?", (cmd.state, cmd.model_dump_json(), cmd.id))

    def get(self, command_id: str) -> Optional[Command]:
        with self._lock:
            row = self._db.execute("SELECT body FROM commands WHERE id = ?", (command_id,)).fetchone()
        return Command.model_validate_json(row[0]) if row else None

    def pending(self, job: str, now: Optional[float] = None) -> list[Command]:
        """Unacknowledged, unexpired commands of `job`, oldest first; expired ones are marked and audited."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT body FROM commands WHERE job = ? AND state = 'pending'", (job,)).fetchall()
        out = []
        for (body,) in rows:
            cmd = Command.model_validate_json(body)
            if cmd.expires_at < now:
                cmd = cmd.model_copy(update={"state": "expired"})
                self._save(cmd)
                self.audit(job, "expired", {"kind": cmd.spec.kind}, cmd.id)
            else:
                out.append(cmd)
        return sorted(out, key=lambda c: c.created_at)

    def acknowledge(self, command_id: str, ack: Ack) -> Optional[Command]:
        """Record the outcome once; a repeated ack changes nothing (returns the stored command)."""
        cmd = self.get(command_id)
        if cmd is not None and cmd.state == "expired" and ack.outcome == "applied" and cmd.acked_step is None:
            # it expired here while already on its way: it did run, on every rank; say so
            cmd = cmd.model_copy(update={"state": "acked", "acked_step": ack.step, "outcome": "applied after expiry"})
            self._save(cmd)
            self.audit(cmd.job, "applied", {"step": ack.step, "kind": cmd.spec.kind, "detail": "after it expired here"}, cmd.id)
            return cmd
        if cmd is None or cmd.state != "pending":
            return cmd
        state = {"applied": "acked", "expired": "expired", "rejected": "rejected"}[ack.outcome]
        cmd = cmd.model_copy(update={"state": state, "acked_step": ack.step, "outcome": ack.outcome})
        self._save(cmd)
        self.audit(cmd.job, ack.outcome, {"step": ack.step, "kind": cmd.spec.kind, "detail": ack.detail}, cmd.id)
        return cmd

    def commands(self, job: Optional[str] = None) -> list[Command]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM commands" + (" WHERE job = ?" if job else ""), (job,) if job else ()).fetchall()
        return sorted((Command.model_validate_json(b) for (b,) in rows), key=lambda c: c.created_at)

    def audit_log(self, job: Optional[str] = None, limit: int = 1000) -> list[dict]:
        query = "SELECT seq, ts, job, command, event, detail FROM audit" + (" WHERE job = ?" if job else "") + " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, ((job,) if job else ()) + (limit,)).fetchall()
        return [dict(seq=s, ts=ts, job=j, command=c, event=e, detail=json.loads(d)) for s, ts, j, c, e, d in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            self._db.close()
