"""End to end, all real processes: four 2-rank gloo training jobs with the agent (NaN injected on one
rank, the exploding unscaled regression, the vanishing sigmoid stack, and a healthy run), one Prometheus
scraping their rank-0 endpoints every second with deploy/'s config and rule file, the aggregator,
and Alertmanager (deploy/'s routing) notifying the test's webhook receiver - the pager.

The three injected rules get second-scale `for`/windows (a rules YAML, as users override them); the
other seven keep their minutes-long defaults, so they are checked for false positives only where a
30-second run can reach them. Prints the time from fault to page.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest

from conftest import free_port, launch
from servers import Pager, aggregator, alertmanager, http_json, prometheus, running, wait_for

RULES = """
interval: 1s
rules:
  nan_gradient: {window: 10s}
  exploding_gradient: {window: 30s, for: 2s}
  vanishing_gradient: {for: 3s}
"""

JOBS = {
    # job: (kind, steps, seconds per step, extra)
    "e2e-healthy": ("healthy", 100, 0.25, {}),
    "e2e-nan": ("nan", 70, 0.25, {"fault_step": 30}),
    "e2e-exploding": ("exploding", 25, 1.0, {}),
    "e2e-vanishing": ("vanishing", 70, 0.35, {}),
}
EXPECTED = {
    "e2e-nan": ("GradwatchNanGradient", {"layer": "3", "rank": "1", "kind": "activation"}, "training-pager"),
    "e2e-exploding": ("GradwatchExplodingGradient", {}, "training-pager"),
    "e2e-vanishing": ("GradwatchVanishingGradient", {}, "training-chat"),
}


@pytest.mark.multiproc
def test_faults_page_through_prometheus_aggregator_and_alertmanager(tmp_path: Path, capsys):
    pager = Pager()
    ports = {job: free_port() for job in JOBS}
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    prom = prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports.values()])
    am = alertmanager(tmp_path, pager.url)
    with running(prom, am):
        agg = aggregator(tmp_path, prom.url, am.url, rules, tmp_path / "state.db")
        with running(agg), cf.ThreadPoolExecutor(len(JOBS)) as pool:
            futures = {
                job: pool.submit(launch, "alerting", 2, tmp_path / job, timeout=240,
                                 kind=kind, job=job, port=ports[job], steps=steps, seconds_per_step=pace, linger=3, **extra)
                for job, (kind, steps, pace, extra) in JOBS.items()
            }
            results = {job: f.result() for job, f in futures.items()}
            pages = {}
            for job, (alertname, labels, receiver) in EXPECTED.items():
                found = wait_for(lambda: pager.alerts("firing", alertname=alertname, job=job), 60, f"{alertname} for {job}")
                pages[job] = min(found, key=lambda a: a["received"])
                located = [a for a in found if a["labels"].get("layer") and all(a["labels"].get(k) == v for k, v in labels.items())]
                assert located, (job, [a["labels"] for a in found])  # the page names the layer (and rank)
                assert all(a["receiver"] == receiver and a["annotations"]["runbook"] for a in found)
            # the vanishing pages name the layers the gradient vanished at: the first, never the last of the 30 blocks
            vanished = {int(a["labels"]["layer"].split(".")[0]) for a in pager.alerts("firing", job="e2e-vanishing")}
            assert 0 in vanished and max(vanished) < 20, vanished
            assert "ReLU" in pages["e2e-vanishing"]["annotations"]["runbook"]
            assert pager.alerts(job="e2e-healthy") == [], pager.alerts(job="e2e-healthy")
            with capsys.disabled():  # shown in every run, not only with -s
                for job, page in pages.items():
                    fault = results[job][0]["fault_time"]
                    layers = sorted({a["labels"].get("layer", "-") for a in pager.alerts("firing", job=job, alertname=page["labels"]["alertname"])})
                    print(f"\n{job}: {page['labels']['alertname']} paged {page['received'] - fault:.1f} s after the fault; "
                          f"{len(layers)} layer(s), first {layers[0]}")
            # nothing else paged for the faulty jobs but what follows from their fault
            allowed = {"e2e-nan": {"GradwatchNanGradient", "GradwatchRankOutlier"},
                       "e2e-exploding": {"GradwatchExplodingGradient", "GradwatchNanGradient"},
                       "e2e-vanishing": {"GradwatchVanishingGradient"}}
            for job, names in allowed.items():
                assert {a["labels"]["alertname"] for a in pager.alerts(job=job)} <= names
            assert http_json(agg.url + "/healthz")["status"] == "ok"
    pager.close()
