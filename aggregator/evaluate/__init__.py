"""In-process evaluation of compiled rules: a PromQL-subset interpreter over an in-memory series
store, and the alert state machine shared with the aggregator service."""

from .alerts import FIRING, PENDING, RESOLVED, Alert, AlertTracker, Transition
from .engine import RuleEngine
from .interpreter import EvaluationError, Sample, evaluate
from .series import SeriesStore

__all__ = [
    "Alert", "AlertTracker", "EvaluationError", "FIRING", "PENDING", "RESOLVED", "RuleEngine", "Sample",
    "SeriesStore", "Transition", "evaluate",
]
