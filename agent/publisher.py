"""Hands measured steps to the sinks on a background thread, so the training step never waits on
an HTTP scrape, a slow disk or a listener. The queue is bounded: if the sinks fall behind, the
oldest pending steps are dropped and counted, never the training loop blocked.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Callable, Optional

from .stats import StepStats

log = logging.getLogger("gradwatch.agent")

Sink = Callable[[StepStats], None]


class JsonlSink:
    """One JSON object per measured step. NaN/inf are written as the tokens NaN/Infinity/-Infinity
    (as Python's json does) rather than dropped: they are the signal."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, stats: StepStats) -> None:
        self._file.write(json.dumps(stats.to_dict()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Publisher:
    """A daemon thread draining a bounded queue into named sinks; a sink that raises is disabled
    (reported once through `on_error`) and the others go on."""

    def __init__(self, sinks: dict[str, Sink], on_error: Callable[[str, BaseException], None], maxsize: int = 64) -> None:
        self.sinks = dict(sinks)
        self._on_error = on_error
        self._queue: "queue.Queue[Optional[StepStats]]" = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="gradwatch-publisher", daemon=True)
        self._thread.start()

    def submit(self, stats: StepStats) -> None:
        if self.sinks:  # else nothing to hand it to: do not wake the thread
            self._put(stats)

    def _put(self, item: Optional[StepStats]) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()  # or flush()'s join would wait for it forever
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while True:
            stats = self._queue.get()
            try:
                if stats is None:
                    return
                for name, sink in list(self.sinks.items()):
                    try:
                        sink(stats)
                    except Exception as exc:  # a broken sink must not take the others down
                        self.sinks.pop(name, None)
                        self._on_error(name, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until everything submitted so far has reached the sinks, or been dropped;
        False if the time ran out first."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._put(None)  # stop, after what is queued
        self._thread.join(timeout)
