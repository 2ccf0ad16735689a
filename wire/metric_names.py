"""Every metric family gradwatch exports, named once: the agent's exporter writes them, the rule
compiler, the remediation policy and the dashboards query them. A rename here is a rename
everywhere; a name typed as a string literal elsewhere would drift silently (docs/metrics.md
documents each family).

Counters are named as PromQL sees them, with `_total`: prometheus_client's counter families strip
the suffix for the `# TYPE` line and add it back to the sample.
"""

from __future__ import annotations

# ---- the agent (rank 0's /metrics) ----------------------------------------------------------------

# per layer (label `layer`)
LAYER_GRAD_NORM = "gradwatch_layer_grad_norm"
LAYER_GRAD_MAX_ABS = "gradwatch_layer_grad_max_abs"
LAYER_GRAD_NONFINITE = "gradwatch_layer_grad_nonfinite"
LAYER_WEIGHT_NORM = "gradwatch_layer_weight_norm"
LAYER_UPDATE_RATIO = "gradwatch_layer_update_ratio"

# per activation module (label `layer`)
ACTIVATION_MEAN = "gradwatch_activation_mean"
ACTIVATION_STD = "gradwatch_activation_std"
ACTIVATION_MAX_ABS = "gradwatch_activation_max_abs"
ACTIVATION_NONFINITE = "gradwatch_activation_nonfinite"
ACTIVATION_SATURATED_RATIO = "gradwatch_activation_saturated_ratio"
ACTIVATION_DEAD_RATIO = "gradwatch_activation_dead_ratio"

# per rank (label `rank`)
RANK_LOSS = "gradwatch_rank_loss"
RANK_NONFINITE = "gradwatch_rank_nonfinite"
RANK_STEP_SECONDS = "gradwatch_rank_step_seconds"
RANK_LAST_STEP = "gradwatch_rank_last_step"
RANK_PHASE = "gradwatch_rank_phase"
RANK_PROGRESS_TIMESTAMP = "gradwatch_rank_progress_timestamp_seconds"
RANK_HEARTBEAT_TIMESTAMP = "gradwatch_rank_heartbeat_timestamp_seconds"

# per job
STEP = "gradwatch_step"
GRAD_NORM = "gradwatch_grad_norm"
GRAD_NORM_EARLY_LATE_RATIO = "gradwatch_grad_norm_early_late_ratio"
LAST_STEP_TIMESTAMP = "gradwatch_last_step_timestamp_seconds"
LOSS = "gradwatch_loss"
LOSS_MAX = "gradwatch_loss_max"
EVAL_LOSS = "gradwatch_eval_loss"
LEARNING_RATE = "gradwatch_learning_rate"  # label `param_group`
GUARD_CLIP_BOUND = "gradwatch_guard_clip_bound"
NAN_ORIGIN_STEP = "gradwatch_nan_origin_step"  # labels `kind`, `layer`, `rank`
AGENT_INFO = "gradwatch_agent_info"  # labels `version`, `world_size`, `sharding`
TRAINING_FINISHED = "gradwatch_training_finished"

# counters
STEPS_TOTAL = "gradwatch_steps_total"
NONFINITE_STEPS_TOTAL = "gradwatch_nonfinite_steps_total"
SKIPPED_STEPS_TOTAL = "gradwatch_skipped_steps_total"  # label `reason`
CLIPPED_STEPS_TOTAL = "gradwatch_clipped_steps_total"
COMMANDS_APPLIED_TOTAL = "gradwatch_commands_applied_total"  # label `kind`
AGENT_COLLECTIVES_TOTAL = "gradwatch_agent_collectives_total"
AGENT_HOST_SYNCS_TOTAL = "gradwatch_agent_host_syncs_total"
AGENT_ERRORS_TOTAL = "gradwatch_agent_errors_total"  # label `feature`

# ---- the aggregator (its own /metrics) ------------------------------------------------------------

AGGREGATOR_EVALUATIONS_TOTAL = "gradwatch_aggregator_evaluations_total"
AGGREGATOR_RULE_FAILURES_TOTAL = "gradwatch_aggregator_rule_evaluation_failures_total"
AGGREGATOR_EVALUATION_DURATION = "gradwatch_aggregator_evaluation_duration_seconds"
AGGREGATOR_LAST_EVALUATION_TIMESTAMP = "gradwatch_aggregator_last_evaluation_timestamp_seconds"
AGGREGATOR_PROMETHEUS_UP = "gradwatch_aggregator_prometheus_up"
AGGREGATOR_ALERTMANAGER_UP = "gradwatch_aggregator_alertmanager_up"
AGGREGATOR_NOTIFICATIONS_TOTAL = "gradwatch_aggregator_notifications_total"
AGGREGATOR_PENDING_DELIVERIES = "gradwatch_aggregator_pending_deliveries"
AGGREGATOR_ALERTS = "gradwatch_aggregator_alerts"  # label `state`
