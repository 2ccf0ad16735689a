"""Alert state in SQLite, so a restarted aggregator resumes `for` timers, remembers what
Alertmanager already has (no re-page) and still delivers resolutions it owed (no lost alert)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

from ..evaluate.alerts import Alert

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (rule, fingerprint)
)
"""


def connect(path: Path, *schema: str) -> sqlite3.Connection:
    """The state file, shared by the alert and command stores: autocommit (explicit transactions
    where needed), WAL so the API's reads never block the evaluation loop's writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in schema:
        db.execute(statement)
    return db


class AlertStore:
    def __init__(self, path: Path) -> None:
        self._db = connect(path, SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> list[Alert]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM alerts").fetchall()
        alerts = []
        for (body,) in rows:
            data = json.loads(body)
            data.pop("fingerprint", None)
            alerts.append(Alert(**data))
        return alerts

    def replace_all(self, alerts: Iterable[Alert]) -> None:
        """Make the table hold exactly `alerts`, atomically."""
        rows = [(a.rule, a.fingerprint, json.dumps(a.to_dict())) for a in alerts]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM alerts")
                self._db.executemany("INSERT INTO alerts (rule, fingerprint, body) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
