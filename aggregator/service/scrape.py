"""Rules without Prometheus: the aggregator reads the agents' own /metrics endpoints directly and
answers every rule's query (and the policy's) with the in-process evaluator - the same expressions
Prometheus would run, over the same series a scrape gives it. The embedded default of `gradwatch
demo`, and a way to watch a single job where no Prometheus runs.

One scrape of every target per evaluation round: the first query of a round (a new evaluation time)
triggers it. History is kept in memory for as long as the longest rule reads back.
"""

from __future__ import annotations

import logging
from typing import Union

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..evaluate.interpreter import LOOKBACK_MS, Sample, evaluate
from ..evaluate.series import SeriesStore
from ..rules.promql import Expr
from .clients import Unreachable, UpstreamError

log = logging.getLogger("gradwatch.aggregator")


class ScrapeSource:
    """A stand-in for `PrometheusClient`: `query(expr, at)` over series scraped from `targets`."""

    def __init__(self, targets: list[str], timeout: float, history_s: int) -> None:
        if not targets:
            raise ValueError("ScrapeSource needs at least one /metrics URL")
        self.targets = list(targets)
        self.store = SeriesStore(retention_s=history_s + LOOKBACK_MS // 1000 + 60)
        self._http = httpx.Client(timeout=timeout)
        self._scraped_at: float | None = None

    def query(self, expr: Union[Expr, str], at: float) -> list[Sample]:
        if isinstance(expr, str):
            raise UpstreamError("without Prometheus only gradwatch's own rule expressions can be evaluated, not PromQL text")
        if self._scraped_at != at:
            self._scrape(at)
        return evaluate(expr, self.store, int(round(at * 1000)))

    def _scrape(self, at: float) -> None:
        t_ms = int(round(at * 1000))
        reached = 0
        for url in self.targets:
            try:
                response = self._http.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.debug("gradwatch aggregator: scrape of %s failed: %r", url, exc)
                continue
            reached += 1
            samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text) for s in family.samples]
            self.store.add_many(samples, t_ms)
        self.store.prune(t_ms)
        self._scraped_at = at
        if not reached:
            raise Unreachable(f"no agent answered at {', '.join(self.targets)}")

    def close(self) -> None:
        self._http.close()
