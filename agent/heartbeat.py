"""Per-rank liveness that keeps reporting while a training thread is blocked (in a collective, on
data, anywhere): the page for a hung job names the rank(s) that did not arrive.

The training thread only writes `Progress` (one tuple assignment per phase change, no lock, no
sync). A daemon thread on every rank publishes it to the job's c10d store - the TCPStore
`torchrun` already runs, reachable from every node - every `heartbeat_s`; rank 0's thread reads
every rank's entry back into the exporter's state, so the metrics endpoint (its own thread) serves
fresh per-rank progress even when every training thread is stuck. Nothing here is a collective: a
dead or slow store delays only these threads (each store call is bounded by the store's timeout).

The same thread carries the out-of-band stack dump: `request_stack_dump` bumps a counter in the
store, and every rank's thread writes all its Python stacks (faulthandler) to stderr when the
counter moves - the one remediation that must work while no step runs. SIGUSR1 does the same
for one process (`kill -USR1 <pid>`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("gradwatch.agent")

# Where a rank's training thread is within a step (gradwatch_rank_phase).
BETWEEN, FORWARD, BACKWARD, OPTIMIZER = 0, 1, 2, 3
PHASES = ("between steps (data, user code)", "forward", "after forward (loss, backward, gradient all-reduce)",
          "optimizer step (the agent's all-reduce, the optimizer)")


@dataclass(frozen=True)
class Beat:
    """One rank's progress as last published: read by the exporter."""

    last_step: int  # last completed optimizer step (-1: none yet)
    phase: int
    progress_time: float  # Unix time the training thread entered `phase` (or completed `last_step`)
    beat_time: float  # Unix time the rank's heartbeat thread published this


class Progress:
    """The training thread's position; written there, read by the heartbeat thread."""

    def __init__(self) -> None:
        self.now: tuple[int, int, float] = (-1, BETWEEN, time.time())

    def enter(self, phase: int) -> None:
        last = self.now[0]
        self.now = (last, phase, time.time())

    def completed(self, step: int) -> None:
        self.now = (step, BETWEEN, time.time())


def hook_phases(model: torch.nn.Module, progress: Progress) -> list[Any]:
    """Forward pre/post hooks on the root module mark forward and after-forward. Inside a compiled
    region they do nothing (the check folds to a constant: no graph break); the step marks still work."""

    def before(_module: Any, _args: Any) -> None:
        if not torch.compiler.is_compiling():
            progress.enter(FORWARD)

    def after(_module: Any, _args: Any, _output: Any) -> None:
        if not torch.compiler.is_compiling():
            progress.enter(BACKWARD)

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def install_stack_signal() -> bool:
    """SIGUSR1 writes every thread's Python stack to stderr, unless the process already handles it."""
    try:
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL:
            return False
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        return True
    except (AttributeError, ValueError, OSError, RuntimeError):  # no SIGUSR1 (Windows), or no usable stderr
        return False


def dump_stacks(rank: int, reason: str) -> None:
    log.error("gradwatch: rank %d: Python stacks of every thread follow (%s)", rank, reason)
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (ValueError, OSError, RuntimeError):
        log.error("gradwatch: rank %d: could not write the stacks (stderr is not a file)", rank)


def _default_store() -> Optional[Any]:
    """A connection of this thread's own to the job's store: a store client is not safe to share
    with the training thread (a beat sent while it waits in new_group's rendezvous hung the beat)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.distributed_c10d._get_default_store().clone()
    return None


class Heartbeat:
    """Every rank's heartbeat thread; on rank 0 it also collects all ranks into `on_beats`."""

    def __init__(self, job: str, rank: int, world_size: int, progress: Progress, period_s: float,
                 on_beats: Callable[[dict[int, Beat]], None], on_error: Callable[[BaseException], None]) -> None:
        self.rank, self.world_size, self.progress, self.period_s = rank, world_size, progress, period_s
        self._on_beats, self._on_error = on_beats, on_error
        self._prefix = f"gradwatch/{job}/"
        self._store = _default_store()
        self._dumps_seen: Optional[int] = None  # the count at the first beat: a restarted job's old requests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-heartbeat", daemon=True)
        self._thread.start()

    def request_stack_dump(self) -> None:
        """Every rank writes its stacks within a heartbeat period (this one included)."""
        if self._store is None:
            dump_stacks(self.rank, "requested")
        else:
            self._store.add(self._prefix + "dump_stacks", 1)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while True:  # one last beat after close(): a rank that finished shows its last step
            try:
                self._beat()
            except Exception as exc:  # a store gone: say so once, stop beating; training goes on
                self._on_error(exc)
                return
            if stopping:
                return
            stopping = self._stop.wait(self.period_s)

    def _beat(self) -> None:
        last_step, phase, since = self.progress.now
        mine = Beat(last_step, phase, since, time.time())
        if self._store is None:
            self._on_beats({self.rank: mine})
            return
        self._store.set(self._key(self.rank), json.dumps([mine.last_step, mine.phase, mine.progress_time, mine.beat_time]))
        dumps = self._store.add(self._prefix + "dump_stacks", 0)  # a non-blocking read
        if self._dumps_seen is not None and dumps > self._dumps_seen:
            dump_stacks(self.rank, f"stack dump #{dumps} requested through the store")
        self._dumps_seen = dumps
        if self.rank == 0:
            self._on_beats(self._collect())

    def _collect(self) -> dict[int, Beat]:
        beats: dict[int, Beat] = {}
        keys = [self._key(r) for r in range(self.world_size)]
        assert self._store is not None
        if self._store.check(keys):  # get() would wait for a rank that has not beaten yet
            values = self._store.multi_get(keys)
        else:
            values = [self._store.get(k) if self._store.check([k]) else None for k in keys]
        for r, raw in enumerate(values):
            if raw is not None:
                last_step, phase, since, beat = json.loads(bytes(raw).decode())
                beats[r] = Beat(int(last_step), int(phase), float(since), float(beat))
        return beats

    def _key(self, rank: int) -> str:
        return f"{self._prefix}heartbeat/{rank}"
