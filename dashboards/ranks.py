"""Ranks: the one rank whose loss, step time or NaNs differ - a bad data shard, a slow or faulty GPU.
Each quantity is shown raw and relative to the median rank, where an outlier stands out at any scale."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from ..wire import metric_names as names
from .common import JOB, RANK, dashboard, job_variable, latest, query, rank_variable, series, thresholds

UID = "gradwatch-ranks"


def _vs_median(metric: str) -> str:
    return f"{metric}{{{JOB}, {RANK}}} / on (job) group_left () quantile by (job) (0.5, {metric}{{{JOB}}})"


def build() -> db.Dashboard:
    outlier = thresholds("green", (1.5, "orange"), (2, "red"))  # the rank-outlier rule flags 2x the median loss
    panels = [
        series("Loss per rank", "Each rank's local loss.", "short",
               [query(f"{names.RANK_LOSS}{{{JOB}, {RANK}}}", "rank {{rank}}")], log=True),
        series("Loss / median rank's", "1 = typical; the rank-outlier alert fires at 2x (averaged over 5m).", "percentunit",
               [query(_vs_median(names.RANK_LOSS), "rank {{rank}}")]),
        series("Step time per rank", "Wall time between the rank's steps.", "s",
               [query(f"{names.RANK_STEP_SECONDS}{{{JOB}, {RANK}}}", "rank {{rank}}")]),
        latest("Step time / median rank's", "Latest; a straggler slows every rank of a synchronous job.", "percentunit",
               [query(_vs_median(names.RANK_STEP_SECONDS), "rank {{rank}}")], limits=outlier),
        series("Non-finite items per rank", "NaN/inf items on the rank this step (loss, modules, gradient layers): "
               "one rank alone points at its data shard or its device.", "none",
               [query(f"{names.RANK_NONFINITE}{{{JOB}, {RANK}}}", "rank {{rank}}")], w=24, h=6, bars=True),
        series("Progress per rank", "Last completed step + phase / 4 (phase 0 between steps, 1 forward, 2 after forward: "
               "backward and the gradient all-reduce, 3 optimizer step), from the heartbeat: in a hung job the rank "
               "furthest behind is the one the others wait for.", "short",
               [query(f"{names.RANK_LAST_STEP}{{{JOB}, {RANK}}} + {names.RANK_PHASE}{{{JOB}, {RANK}}} / 4", "rank {{rank}}")]),
        series("Seconds without progress / heartbeat age", "Time since the rank's training thread last moved (solid), and "
               "since its heartbeat thread last reported (a growing heartbeat age: the process or its host is gone).", "s",
               [query(f"time() - {names.RANK_PROGRESS_TIMESTAMP}{{{JOB}, {RANK}}}", "rank {{rank}} progress"),
                query(f"time() - {names.RANK_HEARTBEAT_TIMESTAMP}{{{JOB}, {RANK}}}", "rank {{rank}} heartbeat")]),
    ]
    return dashboard(UID, "gradwatch / Ranks", "Per-rank loss, step time, non-finite counts and liveness (progress, heartbeat).",
                     [job_variable(), rank_variable()], panels)
