"""What the agent and the aggregator exchange, in one dependency-free place (pydantic only): the
remediation commands and their float encoding (`commands`), and the metric family names
(`metric_names`). Both halves import this package, never each other, so each installs and imports
without the other's dependencies."""
