"""gradwatch's in-process agent: per-layer training health on every DDP/FSDP rank.

    from gradwatch.agent import HealthAgent
    agent = HealthAgent(model, optimizer, job="my-run")
    ...
    agent.step(optimizer, loss=loss)   # instead of optimizer.step()
"""

from .config import AgentConfig
from .health_agent import AppliedCommand, HealthAgent, attached_agent
from .stats import ActivationStats, NanOrigin, RankStats, StepStats

__all__ = ["AgentConfig", "HealthAgent", "AppliedCommand", "attached_agent", "StepStats", "RankStats", "ActivationStats", "NanOrigin"]
