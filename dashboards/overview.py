"""Job overview: is this run healthy right now? Loss, the global gradient norm against the guard's
clip bound, learning rate, skipped steps, what is alerting, and which commands changed the run."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from ..wire import metric_names as names
from .common import JOB, Annotation, dashboard, job_variable, query, rows, series, single, thresholds

UID = "gradwatch-overview"


def build() -> db.Dashboard:
    commands = f"{names.COMMANDS_APPLIED_TOTAL}{{{JOB}}}"
    panels = [
        single("Step", "Latest measured optimizer step.", "none", query(f"{names.STEP}{{{JOB}}}")),
        single("Step rate", "Optimizer steps per second through the agent.", "suffix: steps/s",
               query(f"rate({names.STEPS_TOTAL}{{{JOB}}}[$__rate_interval])")),
        single("Firing alerts", "gradwatch alerts firing for this job (Prometheus ALERTS).", "none",
               query(f'count(ALERTS{{{JOB}, alertstate="firing"}})'), limits=thresholds("green", (1, "red")), no_value="0"),
        single("Non-finite steps", "Measured steps with any NaN/inf (AMP overflows excluded).", "none",
               query(f"{names.NONFINITE_STEPS_TOTAL}{{{JOB}}}"), limits=thresholds("green", (1, "red"))),
        series("Loss", "Training loss: mean and max across ranks, and the latest eval loss.", "short", [
            query(f"{names.LOSS}{{{JOB}}}", "mean across ranks"),
            query(f"{names.LOSS_MAX}{{{JOB}}}", "max across ranks"),
            query(f"{names.EVAL_LOSS}{{{JOB}}}", "eval"),
        ], log=True),
        series("Global gradient norm", "L2 norm of all gradients before clipping, and the guard's adaptive clip bound "
               "(mode guard only).", "short", [
            query(f"{names.GRAD_NORM}{{{JOB}}}", "global norm"),
            query(f"{names.GUARD_CLIP_BOUND}{{{JOB}}}", "clip bound"),
        ], log=True),
        series("Learning rate", "Per optimizer param group; a scale_lr command shows as a step down.", "sci", [
            query(f"{names.LEARNING_RATE}{{{JOB}}}", "group {{param_group}}"),
        ], w=8),
        series("Skipped and clipped steps", "Steps skipped with parameters unchanged, by reason, and steps whose "
               "gradients were clipped.", "none", [
            query(f"increase({names.SKIPPED_STEPS_TOTAL}{{{JOB}}}[$__rate_interval])", "skipped: {{reason}}"),
            query(f"increase({names.CLIPPED_STEPS_TOTAL}{{{JOB}}}[$__rate_interval])", "clipped"),
        ], w=8, bars=True),
        series("Commands applied", "Remediation commands applied on every rank, by kind (also marked as annotations).",
               "none", [query(commands, "{{kind}}")], w=8),
        rows("Active alerts", "Pending and firing gradwatch alerts for this job, with the layer/rank they name.",
             query(f"ALERTS{{{JOB}}}", table=True), w=16),
        rows("NaN origin", "Where the first non-finite value appeared: kind, layer, rank(s); the value is the step.",
             query(f"{names.NAN_ORIGIN_STEP}{{{JOB}}}", table=True), w=8),
    ]
    annotations = [
        # A kind's counter is born at 1 when first applied, so `changes` alone would miss the first one.
        Annotation("Commands applied", f"changes({commands}[1m]) > 0 or ({commands} unless {commands} offset 1m)",
                   "orange", "command {{kind}}", "kind"),
        Annotation("Alerts firing", f'ALERTS{{{JOB}, alertstate="firing"}}', "red", "{{alertname}}", "alertname,severity,layer,rank"),
    ]
    return dashboard(UID, "gradwatch / Job overview", "Training health of one job at a glance.",
                     [job_variable()], panels, annotations)
