"""The `gradwatch` command (`main.py`); `python -m gradwatch.cli` runs it too. It spans the agent
(`run`), the aggregator (`rules`, `aggregator`, `signal`), the demo and the dashboards, so it lives
beside them rather than inside one."""

from .main import main, parser

__all__ = ["main", "parser"]
