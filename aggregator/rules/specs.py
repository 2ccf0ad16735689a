"""Rule specifications: the one source of truth for gradwatch's alerts.

Each pathology is a pydantic model whose fields are its thresholds, with defaults taken from the
tools users know (SageMaker Debugger's built-in rules, llm-foundry's callbacks) and from the
standard fixes for each pathology. `RuleSet` holds one of each; a YAML file overrides any field of any rule, and
everything left out keeps its default. `compile.py` turns a spec into PromQL.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .templates import check as check_template

Severity = Literal["critical", "warning", "info"]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(value: object) -> int:
    """Whole seconds from a Prometheus duration ('90s', '5m', '1h30m') or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION.sub("", value) == "":
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(value))
    else:
        raise ValueError(f"{value!r} is not a duration: use seconds or Prometheus text like '90s', '5m', '1h30m'")
    if seconds < 0 or seconds != int(seconds):
        raise ValueError(f"{value!r}: durations are whole, non-negative seconds")
    return int(seconds)


Duration = Annotated[int, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[int, BeforeValidator(parse_duration), Field(gt=0)]


class RuleSpec(BaseModel):
    """Fields every rule has. `for_` is how long the condition must hold before the alert fires."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    enabled: bool = True
    for_: Duration = Field(alias="for")
    severity: Severity
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels on the alert, e.g. team")

    runbook: str = ""  # class default: the fixes a responder should try, per pathology

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for name, value in labels.items():
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__") or name == "alertname":
                raise ValueError(f"{name!r} is not a usable label name (letters, digits, _; not __*, not alertname)")
            if "{{" in value:
                raise ValueError(f"label {name}: templates are not supported in label values")
        return labels

    @field_validator("runbook")
    @classmethod
    def _runbook_renders(cls, text: str) -> str:
        check_template(text)  # rendered as an annotation: only what renders exactly like Prometheus
        return text


class NanGradient(RuleSpec):
    """Any NaN/inf in a gradient, the loss or an activation on any rank."""

    for_: Duration = Field(0, alias="for")
    severity: Severity = "critical"
    window: PositiveDuration = Field(60, description="how far back a non-finite step still counts")
    runbook: str = (
        "Find the first non-finite value (the alert's kind/layer/rank, or gradwatch_nan_origin_step). "
        "A loss or activation NaN first: check the input batch and any log/sqrt/division in the loss "
        "(add an epsilon). A gradient first: lower the learning rate, clip the gradient norm, use bf16 "
        "or a GradScaler for fp16. One rank only: suspect that rank's data shard or its GPU. "
        "Resume from the last finite checkpoint."
    )


class ExplodingGradient(RuleSpec):
    """Global gradient norm far above its own recent median, or above an absolute cap."""

    for_: Duration = Field(60, alias="for")
    severity: Severity = "critical"
    ratio: float = Field(10.0, gt=1, description="fire when the norm exceeds ratio x its median over `window`")
    window: PositiveDuration = 600
    cap: Optional[float] = Field(1e4, gt=0, description="absolute norm above which it fires at once; null for none")
    runbook: str = (
        "Clip the gradient norm (torch.nn.utils.clip_grad_norm_, max_norm around the healthy median), "
        "lower the learning rate or add warm-up, and standardize inputs and regression targets "
        "(an unscaled target makes the loss and its gradient huge). Check the layer named in the "
        "alert: it holds the largest gradient."
    )


class VanishingGradient(RuleSpec):
    """A layer's gradient norm below an absolute floor, or early layers' norm far below late layers'."""

    for_: Duration = Field(300, alias="for")
    severity: Severity = "warning"
    floor: float = Field(1e-7, gt=0, description="per-layer gradient L2 norm floor (smdebug's 1e-7 reference)")
    early_late_floor: float = Field(
        1e-2, gt=0, lt=1,
        description="fire when the first quarter of layers' norm over the last quarter's is below this",
    )
    runbook: str = (
        "Gradients are not reaching the early layers. Replace sigmoid/tanh with ReLU-family activations, "
        "initialize with He (ReLU) or Xavier (tanh) instead of large or unit-variance weights, add batch "
        "or layer normalization, and add skip (residual) connections to shorten the gradient path. "
        "Check saturated activations upstream of the named layer."
    )


class _LayerFraction(RuleSpec):
    """A per-module fraction above `max_ratio` (smdebug's threshold_layer: 50%), sustained."""

    for_: Duration = Field(300, alias="for")
    severity: Severity = "warning"
    max_ratio: float = Field(0.5, gt=0, lt=1)


class SaturatedActivation(_LayerFraction):
    """Most tanh/sigmoid inputs of a module in the flat region (smdebug's limits)."""

    runbook: str = (
        "The module's inputs sit where tanh/sigmoid are flat, so its gradient is almost zero. Lower the "
        "initial weight scale (Xavier), normalize the inputs to the layer (batch/layer norm), lower the "
        "learning rate, or switch to a ReLU-family activation."
    )


class DeadUnits(_LayerFraction):
    """More than half of a layer's units output zero for the whole global batch (dead ReLUs)."""

    runbook: str = (
        "Dead ReLUs never recover: lower the learning rate, use He initialization, use LeakyReLU/GELU, "
        "and check for a large negative bias or an exploding update that pushed pre-activations negative."
    )


class LossNotDecreasing(RuleSpec):
    """The mean loss of the last window is not at least `min_decrease` below the window before."""

    for_: Duration = Field(600, alias="for")
    severity: Severity = "warning"
    window: PositiveDuration = 600
    min_decrease: float = Field(0.01, ge=0, lt=1, description="relative decrease required per window")
    runbook: str = (
        "Training has plateaued. Check the learning-rate schedule (decayed to ~0? never warmed up?), "
        "whether gradients vanish (see the vanishing-gradient alert), and overfit one small batch to "
        "prove the model can learn. A plateau near the end of a run may be expected."
    )


class LossSpike(RuleSpec):
    """Loss at least `factor` x its mean over the preceding window, sustained (llm-foundry's rule)."""

    for_: Duration = Field(60, alias="for")
    severity: Severity = "warning"
    factor: float = Field(2.0, gt=1)
    window: PositiveDuration = 600
    baseline_offset: PositiveDuration = Field(60, description="the baseline window ends this long ago, so a spike does not raise its own baseline")
    runbook: str = (
        "Find the batch (gradwatch_step at the spike): bad or duplicated data is common. Otherwise "
        "lower the learning rate, tighten gradient clipping, or roll back to a checkpoint before the "
        "spike and skip the offending batches. Assumes a non-negative loss."
    )


class WeightUpdateRatio(RuleSpec):
    """||dw||/||w|| of a layer outside [low, high] (smdebug's [1e-8, 10]); exactly 0 (frozen) is ignored."""

    for_: Duration = Field(300, alias="for")
    severity: Severity = "warning"
    low: float = Field(1e-8, gt=0)
    high: float = Field(10.0, gt=0)
    runbook: str = (
        "Healthy updates are around 1e-3 of the weights. Too small: the learning rate is too low or "
        "gradients vanish. Too large: lower the learning rate, clip gradients, check weight decay and "
        "the optimizer's epsilon."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "WeightUpdateRatio":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Overfit(RuleSpec):
    """(validation loss - mean training loss) / mean training loss above `max_gap` (smdebug's 0.1)."""

    for_: Duration = Field(600, alias="for")
    severity: Severity = "info"
    max_gap: float = Field(0.1, gt=0)
    window: PositiveDuration = 600
    runbook: str = (
        "Validation loss is pulling away from training loss. Add regularization (weight decay, dropout, "
        "augmentation), get more data, or stop early at the best validation checkpoint."
    )


class RankOutlier(RuleSpec):
    """One rank departs from the others: NaN/inf on it while another rank is clean, or its mean loss
    above `loss_factor` x the ranks' median (needs 3+ ranks to be meaningful)."""

    for_: Duration = Field(120, alias="for")
    severity: Severity = "warning"
    window: PositiveDuration = 300
    loss_factor: float = Field(2.0, gt=1)
    runbook: str = (
        "One rank disagrees with the rest. Check that rank's data shard (a corrupt or unshuffled file), "
        "its host and GPU (ECC errors, throttling: join with DCGM metrics), and that every rank runs the "
        "same code and config."
    )


class TrainingStalled(RuleSpec):
    """No rank of the job has made progress for max(`min_seconds`, `factor` x the median step time
    over `window`); the alert names the rank(s) furthest behind (lowest step + phase / 4)."""

    for_: Duration = Field(0, alias="for")
    severity: Severity = "critical"
    min_seconds: PositiveDuration = Field(600, description="never call a job stalled sooner than this")
    factor: float = Field(20.0, gt=1, description="stalled after factor x the median step time, if that is longer")
    window: PositiveDuration = Field(1800, description="the window of the median step time")
    runbook: str = (
        "Every rank named is the furthest behind; the others wait for it, usually inside a collective "
        "(phase 2, after forward: loss, backward, the gradient all-reduce). gradwatch_rank_phase says where a rank stopped: "
        "0 between steps (data loading, user code), 1 forward, 2 after forward, 3 optimizer step. Every rank's Python stacks "
        "are in its log: the aggregator's policy sends dump_stacks on this alert (or `gradwatch signal --job JOB dump-stacks`, "
        "or `kill -USR1 PID`, or py-spy dump --pid PID). Check the named rank's heartbeat age (time() - gradwatch_rank_heartbeat_timestamp_seconds): "
        "a fresh heartbeat means the process lives and its training thread is blocked (data loader, "
        "deadlock, NCCL hang: set TORCH_NCCL_ASYNC_ERROR_HANDLING=1 and a process group timeout); an "
        "old one means the process or its host died (OOM kill, GPU Xid, node loss: check dmesg and "
        "the scheduler). If every rank is named, no rank is behind: all wait on something common "
        "(a filesystem or checkpoint write, an object store, the network, or rank 0's own code between "
        "steps, e.g. a long evaluation). Restart from the last checkpoint, excluding a bad node."
    )


class AgentDown(RuleSpec):
    """The job's metrics stopped arriving: its agent's target is down (`up == 0`) or gone, for `for`.
    Remembers a job for `window` after its last scrape (the alert resolves then)."""

    for_: Duration = Field(300, alias="for")
    severity: Severity = "warning"
    window: PositiveDuration = Field(3600, description="how long a job that stopped reporting is remembered")
    runbook: str = (
        "Prometheus no longer gets the job's metrics from its rank 0. A job that finished normally "
        "does this too: check the launcher or the pod (kubectl get pod: Completed vs Error/OOMKilled; "
        "the torchrun exit code) and the last step reached (last_over_time(gradwatch_step[1h])) "
        "against the planned steps. Still running: check the target (Prometheus /targets, up), that "
        "rank 0 still serves GRADWATCH_METRICS_PORT, and the network path. Crashed: read rank 0's log "
        "and restart from the last checkpoint."
    )


class Straggler(RuleSpec):
    """One rank's mean step time over `window` above `factor` x the ranks' median (NVIDIA
    resiliency-ext's relative score), sustained. Sees only ranks whose step time can differ: under
    synchronous data parallelism every rank's wall step time is the same (docs/rules.md)."""

    for_: Duration = Field(300, alias="for")
    severity: Severity = "warning"
    factor: float = Field(1.5, gt=1)
    window: PositiveDuration = 300
    runbook: str = (
        "The named rank is slower than the others. (Under synchronous DDP/FSDP every rank's wall step "
        "time is the same, the fast ranks waiting in the all-reduce, so this fires only where ranks' "
        "step times can differ: see docs/rules.md.) Check its GPU (clocks, thermal or power throttling, "
        "ECC errors: nvidia-smi -q, DCGM), its host (CPU contention, another process on the GPU, swap), "
        "its data loader (slow storage, too few workers) and its network link. Move the rank off the "
        "node, or restart excluding it, if the slowdown persists."
    )


class ThroughputDrop(RuleSpec):
    """The job's step rate over `window` below `min_fraction` of its rate over the `baseline`
    window just before, sustained."""

    for_: Duration = Field(600, alias="for")
    severity: Severity = "warning"
    min_fraction: float = Field(0.5, gt=0, lt=1, description="fire below this fraction of the baseline step rate")
    window: PositiveDuration = 600
    baseline: PositiveDuration = Field(3600, description="the baseline window, ending where `window` starts")
    runbook: str = (
        "Steps per second fell well below the job's own recent rate. Look for a straggler rank (the "
        "straggler alert, per-rank step time), a slower input pipeline (data loading time, storage), "
        "checkpointing or evaluation running more often, GPU throttling, or contention from another "
        "job on the nodes or the network. A planned change (larger batch, longer sequences) also does this."
    )


RULE_TYPES: dict[str, type[RuleSpec]] = {
    "nan_gradient": NanGradient,
    "exploding_gradient": ExplodingGradient,
    "vanishing_gradient": VanishingGradient,
    "saturated_activation": SaturatedActivation,
    "dead_units": DeadUnits,
    "loss_not_decreasing": LossNotDecreasing,
    "loss_spike": LossSpike,
    "weight_update_ratio": WeightUpdateRatio,
    "overfit": Overfit,
    "rank_outlier": RankOutlier,
    "training_stalled": TrainingStalled,
    "agent_down": AgentDown,
    "straggler": Straggler,
    "throughput_drop": ThroughputDrop,
}


class Rules(BaseModel):
    """One spec per pathology; a YAML file lists only what it changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nan_gradient: NanGradient = NanGradient()
    exploding_gradient: ExplodingGradient = ExplodingGradient()
    vanishing_gradient: VanishingGradient = VanishingGradient()
    saturated_activation: SaturatedActivation = SaturatedActivation()
    dead_units: DeadUnits = DeadUnits()
    loss_not_decreasing: LossNotDecreasing = LossNotDecreasing()
    loss_spike: LossSpike = LossSpike()
    weight_update_ratio: WeightUpdateRatio = WeightUpdateRatio()
    overfit: Overfit = Overfit()
    rank_outlier: RankOutlier = RankOutlier()
    training_stalled: TrainingStalled = TrainingStalled()
    agent_down: AgentDown = AgentDown()
    straggler: Straggler = Straggler()
    throughput_drop: ThroughputDrop = ThroughputDrop()


class PolicySpec(BaseModel):
    """What the aggregator does about firing alerts (docs/remediation.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    dry_run: bool = Field(False, description="audit the commands it would send, send none")
    clip_quantile: float = Field(0.5, gt=0, lt=1, description="exploding: clip to this quantile of the job's recent global norms")
    clip_window: PositiveDuration = 600
    lr_factor: float = Field(0.5, gt=0, lt=1, description="repeated exploding or NaN: scale the learning rate by this")
    repeat_window: PositiveDuration = 600
    min_lr_fraction: float = Field(0.1, gt=0, le=1, description="never scale the learning rate below this fraction of the original")
    dump_stacks_on_stall: bool = Field(True, description="training_stalled: every rank writes its Python stacks to its log")
    max_commands: int = Field(5, ge=1, description="per job per rate_window")
    rate_window: PositiveDuration = 3600


class RuleSet(BaseModel):
    """The whole configuration: evaluation interval, the rule group's name, the rules, and the
    remediation policy (which only the aggregator uses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str = Field("gradwatch", min_length=1)
    interval: PositiveDuration = Field(15, description="how often rules are evaluated (Prometheus and the aggregator)")
    rules: Rules = Rules()
    policy: PolicySpec = PolicySpec()

    def enabled(self) -> list[tuple[str, RuleSpec]]:
        return [(name, spec) for name in RULE_TYPES if (spec := getattr(self.rules, name)).enabled]
