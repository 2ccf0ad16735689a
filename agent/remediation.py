"""The slow loop on a rank: the remediation commands in force, and how they arrive and are taken.

Rank 0's command client pulls a command from the aggregator; rank 0 writes it (sequence number, kind
code, value) into the next measured step's packet, whose SUM gives every rank the same three values.
Every rank reads them from the same reduced packet at the same step, so every rank applies the same
command at the same step and holds the same state (clip bound, learning-rate factor, steps to skip):
the decisions taken from that state need no collective of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..wire.commands import decode, encode
from .exporter import AgentState

log = logging.getLogger("gradwatch.agent")

HALT_EXIT_CODE = 86  # a `halt` command's exit: distinct from crashes (1) and signals (128+n)


@dataclass(frozen=True)
class AppliedCommand:
    """A remediation command as this rank took it (every rank holds the same list)."""

    step: int
    kind: str
    value: float
    outcome: str  # "applied" | "rejected"


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # capturable/fused optimizers: keep it a tensor
            group["lr"].mul_(factor)
        else:
            group["lr"] = group["lr"] * factor


Ack = Callable[[str, int, str, str], None]  # (command id, step, outcome, detail); rank 0 only


class Remediation:
    """The commands in force on this rank. `ack` reports an outcome to the aggregator (rank 0 with a
    command client; None elsewhere) and must not raise."""

    def __init__(self, rank: int, state: AgentState) -> None:
        self.rank = rank
        self.state = state
        self.ack: Optional[Ack] = None
        self.clip_norm: Optional[float] = None  # set_clip_norm in force
        self.lr_factor = 1.0  # product of scale_lr factors in force (reset divides it back out)
        self.skip_left = 0  # skip_steps still to skip
        self.applied: list[AppliedCommand] = []  # every command taken from the wire, in order
        self._arrived: list[list[float]] = []  # [seq, kind code, value] read from reduced packets, not yet applied
        self._sent: dict[int, Any] = {}  # rank 0: seq -> Command put on the wire and not yet applied
        self._seq = 0  # rank 0: the last sequence number used

    @property
    def pending(self) -> bool:
        """A command was read from a reduced packet and waits for the next step to be applied."""
        return bool(self._arrived)

    def send(self, cmd: Any, slot: torch.Tensor) -> None:
        """Rank 0: write `cmd` into a packet's 3-value command slot (the other ranks write zeros)."""
        self._seq += 1
        self._sent[self._seq] = cmd
        code, value = encode(cmd.spec)
        slot[0].fill_(float(self._seq))
        slot[1].fill_(code)
        slot[2].fill_(value)

    def arrive(self, command: list[float]) -> None:
        """A reduced packet's command slot; all zeros when none rode on it."""
        if command[0]:
            self._arrived.append(command)

    def take_skip(self) -> bool:
        """Whether a skip_steps command skips this step (and counts it off)."""
        if self.skip_left <= 0:
            return False
        self.skip_left -= 1
        return True

    def apply_arrived(self, step: int, optimizer: torch.optim.Optimizer) -> Optional[str]:
        """Apply the commands arrived and not yet applied, in order, at this step, up to a halt: returns
        its reason (the caller halts), else None."""
        arrived, self._arrived = self._arrived, []
        for seq, code, value in arrived:
            halt = self._apply(step, optimizer, int(seq), code, value)
            if halt is not None:  # the run ends here: what came after it is rejected at close
                return halt
        return None

    def _apply(self, step: int, optimizer: torch.optim.Optimizer, seq: int, code: float, value: float) -> Optional[str]:
        decoded = decode(code, value)
        if decoded is None:
            return None
        kind, value = decoded
        cmd = self._sent.pop(seq, None) if self.rank == 0 else None
        outcome, detail = "applied", ""
        try:
            if kind == "set_clip_norm":
                self.clip_norm = value
            elif kind == "scale_lr":
                scale_lr(optimizer, value)
                self.lr_factor *= value
            elif kind == "skip_steps":
                self.skip_left = int(value)
            elif kind == "reset":  # divide out rather than restore: a scheduler may have moved the LR since
                scale_lr(optimizer, 1.0 / self.lr_factor)
                self.clip_norm, self.lr_factor, self.skip_left = None, 1.0, 0
        except Exception as exc:  # the same on every rank: report, never kill the run
            outcome, detail = "rejected", repr(exc)[:400]
        if outcome == "applied":
            with self.state.lock:
                self.state.commands_applied_total[kind] = self.state.commands_applied_total.get(kind, 0) + 1
        self.applied.append(AppliedCommand(step, kind, value, outcome))
        if self.rank == 0:
            log.warning("gradwatch: command %s(%g) %s at step %d on every rank", kind, value, outcome, step)
            if cmd is not None and self.ack is not None:
                self.ack(cmd.id, step, outcome, detail)
        if kind == "halt" and outcome == "applied":
            return cmd.spec.reason if cmd is not None else ""
        return None

    def close(self, step: int) -> None:
        """Training ended at `step`: commands arrived are dropped, and those sent but never applied are rejected."""
        self._arrived = []
        sent, self._sent = self._sent, {}
        if self.ack is not None:
            for cmd in sent.values():
                self.ack(cmd.id, step, "rejected", "training ended before the command was applied")
