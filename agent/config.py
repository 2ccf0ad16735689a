"""The agent's configuration: one pydantic model, also read from `GRADWATCH_*` environment variables.

Every field has a safe default so `HealthAgent(model, optimizer)` works unconfigured; every bad value
is rejected at construction with the field name and the reason, before a single step is taken.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")


class AgentConfig(BaseSettings):
    """How much the agent measures, how often, and where it sends it.

    Sampling intervals are step counts, never wall-clock: every rank must take the same decision at
    the same step, or the ranks issue different collectives and the job hangs.
    """

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", extra="forbid", validate_assignment=True)

    job: str = Field("gradwatch", description="Job name, the `job` label of every series.")
    stats_every: int = Field(1, ge=1, description="Measure gradients and loss every N optimizer steps.")
    combine_seconds: float = Field(
        1.0, ge=0, le=600, description="Across ranks, mode observe: combine the measured steps of about this much training time "
        "(at most 16) in one all-reduce and one host read; every step is still measured and published, at most about this late. "
        "0 = read every measured step. One process, mode guard and a clip command in force read every measured step."
    )
    activation_every: int = Field(
        10, ge=0, description="Full activation statistics every N steps (0 = no activation hooks)."
    )
    detail_every: int = Field(
        10, ge=1, description="Per-layer weight norms and gradient max-abs on measured steps that are multiples of N (each is a "
        "pass over every parameter; gradient L2 norms and the non-finite check run on every measured step)."
    )
    update_ratio_every: int = Field(
        10, ge=0, description="Measure ||dw||/||w|| of every N-th step (0 = never); costs one copy of the local parameters for one step."
    )
    layer_depth: Optional[int] = Field(
        None, ge=1, description="Group parameters by the first N components of their module path (None = one layer per parameter tensor)."
    )
    max_layers: int = Field(256, ge=1, le=10_000, description="Cap on reported layers; grouping coarsens automatically to stay under it.")
    max_activation_modules: int = Field(128, ge=1, le=10_000, description="Cap on hooked activation modules.")
    metrics_port: Optional[int] = Field(
        0, ge=0, le=65535, description="Rank 0 serves Prometheus metrics on this port (0 = a free port, logged). None = no server."
    )
    metrics_addr: str = Field("0.0.0.0", description="Address the metrics server binds.")
    jsonl_path: Optional[Path] = Field(None, description="Also write every measured step as one JSON line here (rank 0).")

    mode: Literal["observe", "guard", "off"] = Field(
        "observe",
        description="`observe`: report only. `guard`: also skip non-finite steps and clip gradient-norm spikes "
        "(measures every step). `off`: agent.step is a plain optimizer step.",
    )
    guard_z_threshold: float = Field(2.5, gt=0, description="guard: clip a global norm whose z-score against its EMA exceeds this (ZClip's 2.5).")
    guard_alpha: float = Field(0.97, gt=0, lt=1, description="guard: EMA decay of the norm's mean and variance (ZClip's 0.97).")
    guard_warmup_steps: int = Field(25, ge=1, description="guard: steps that only build the baseline before clipping starts.")
    guard_max_norm: Optional[float] = Field(None, gt=0, description="guard: also clip any global norm above this (None: adaptive only).")

    heartbeat_s: float = Field(
        5.0, ge=0, le=3600,
        description="Every rank publishes its progress (last step, phase) this often from a thread of its own, through the "
        "job's c10d store; rank 0 exports every rank's, so a hung job's page names the ranks that did not arrive (0: off).",
    )
    aggregator_url: Optional[str] = Field(None, description="Rank 0 polls this aggregator for remediation commands (None: no commands).")
    aggregator_token: Optional[SecretStr] = Field(None, description="Bearer token for the aggregator's command endpoints.")
    command_poll_s: float = Field(2.0, gt=0, le=3600, description="How often rank 0 polls for commands (a background thread).")

    @field_validator("job")
    @classmethod
    def _job_is_a_label_value(cls, value: str) -> str:
        if not _LABEL_VALUE.match(value):
            raise ValueError(
                f"job={value!r} must be 1-128 characters of letters, digits and _.:-/ (it becomes a Prometheus label)"
            )
        return value
