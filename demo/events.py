"""The stream between the demo's training job (rank 0 writes) and the demo itself (reads): one JSON
object per line, appended and flushed as it happens, so the live view follows the run without a
socket and a crash loses at most the line being written.

    {"type": "start", "job", "scenario", "world_size", "layers", "metrics_port", "time"}
    {"type": "step", "step", "time", "loss", "grad_norm", "layer_grad_norm", "worst_layer", "lr",
     "clip_bound", "skipped", "clipped"}
    {"type": "alert", "state": "firing"|"resolved", "alertname", "severity", "labels", "step", "time"}
    {"type": "command", "step", "kind", "value", "outcome", "time"}
    {"type": "end", "steps", "final_loss", "nan_origin", "halted", "time"}

NaN and infinities are written as JSON's non-standard tokens (Python reads them back); they are
the signal and are never dropped.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator, TextIO


class EventWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()  # the training thread and the agent's publisher thread both write

    def write(self, event_type: str, **fields: Any) -> None:
        line = json.dumps({"type": event_type, **fields}) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class EventReader:
    """Follows the file as it grows; a partly written last line waits for the next read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def read(self) -> Iterator[dict]:
        try:
            with self.path.open("r", encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                yield json.loads(line)
