"""Remediation commands: what the aggregator's policy or an operator asks every rank of a job to do.

Validated here (pydantic, so a bad command is a 422 and nothing is applied) and encoded as two
exact float64 numbers so rank 0 can carry one to every rank inside the statistics all-reduce.
Imports only pydantic: the agent (which applies them) and the aggregator (which validates, stores and
serves them) both import it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

KINDS = ("set_clip_norm", "scale_lr", "skip_steps", "halt", "reset", "dump_stacks")
# Applied at once by rank 0's command thread, never at a step: a stalled job takes no steps.
OUT_OF_BAND = frozenset({"dump_stacks"})
STATES = ("pending", "acked", "expired", "rejected")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field("", max_length=500)
    ttl_s: int = Field(600, ge=1, le=86400, description="dropped, and reported, if not applied within this")

    def value(self) -> float:
        return 0.0


class SetClipNorm(_Spec):
    kind: Literal["set_clip_norm"] = "set_clip_norm"
    max_norm: float = Field(gt=0)

    @field_validator("max_norm")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("max_norm must be finite")
        return v

    def value(self) -> float:
        return self.max_norm


class ScaleLr(_Spec):
    kind: Literal["scale_lr"] = "scale_lr"
    factor: float = Field(gt=0, le=1, description="only ever lowers the learning rate")

    def value(self) -> float:
        return self.factor


class SkipSteps(_Spec):
    kind: Literal["skip_steps"] = "skip_steps"
    n: int = Field(ge=1, le=100_000)

    def value(self) -> float:
        return float(self.n)


class Halt(_Spec):
    kind: Literal["halt"] = "halt"
    reason: str = Field(min_length=1, max_length=500)


class Reset(_Spec):
    kind: Literal["reset"] = "reset"


class DumpStacks(_Spec):
    """Every rank writes the Python stacks of all its threads to its log (faulthandler), within one
    heartbeat period: where a hung job waits. Changes nothing in the training."""

    kind: Literal["dump_stacks"] = "dump_stacks"


CommandSpec = Annotated[Union[SetClipNorm, ScaleLr, SkipSteps, Halt, Reset, DumpStacks], Field(discriminator="kind")]


class Command(BaseModel):
    """A command as stored and served by the aggregator."""

    id: str
    job: str
    spec: CommandSpec
    source: Literal["operator", "policy"]
    created_at: float
    expires_at: float
    state: Literal["pending", "acked", "expired", "rejected"] = "pending"
    acked_step: Optional[int] = None
    outcome: Optional[str] = None


class Ack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    outcome: Literal["applied", "expired", "rejected"] = "applied"
    detail: str = Field("", max_length=500)


def encode(spec: _Spec) -> tuple[float, float]:
    """(kind code, value): exact in float64, so a SUM all-reduce with zeros elsewhere carries them."""
    return float(KINDS.index(spec.kind) + 1), spec.value()  # type: ignore[attr-defined]


def decode(code: float, value: float) -> Optional[tuple[str, float]]:
    index = int(code) - 1
    return (KINDS[index], value) if 0 <= index < len(KINDS) else None
