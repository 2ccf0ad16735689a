"""A hung job, all real processes: 2 gloo ranks, rank 1 stops for good before a forward, rank 0 then
waits in DDP's gradient all-reduce. Its heartbeat still tells which rank did not arrive, and the page
arrives through Prometheus, the aggregator and Alertmanager naming it; the policy's dump_stacks puts
every rank's Python stacks in its log. A healthy job beside it pages nothing."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, start_ranks
from servers import Pager, aggregator, alertmanager, http_text, prometheus, running, wait_for

TOKEN = "liveness-test-token"
STALL_STEP = 12
RULES = """
interval: 1s
rules:
  training_stalled: {min_seconds: 8s, factor: 20, window: 1m}
"""


def per_rank(text: str, name: str) -> dict[str, float]:
    return {s.labels["rank"]: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def stop(procs) -> None:
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.multiproc
def test_a_blocked_rank_zero_still_serves_every_ranks_progress(tmp_path: Path):
    port = free_port()
    procs = start_ranks("stall", 2, tmp_path, job="hb", port=port, steps=1000, seconds_per_step=0.05,
                        stall_step=STALL_STEP, stall_rank=1, heartbeat_s=0.2, out=str(tmp_path))
    try:
        def stalled():
            text = http_text(f"http://127.0.0.1:{port}/metrics")
            phase, last = per_rank(text, "gradwatch_rank_phase"), per_rank(text, "gradwatch_rank_last_step")
            # both completed the step before; rank 0 went on into the all-reduce, rank 1 never arrived
            return text if phase == {"0": 2.0, "1": 0.0} and last == {"0": STALL_STEP - 1, "1": STALL_STEP - 1} else None

        text = wait_for(stalled, 90, "rank 0 waiting after its forward, rank 1 between steps, both after step 11")
        beats = per_rank(text, "gradwatch_rank_heartbeat_timestamp_seconds")
        progress = per_rank(text, "gradwatch_rank_progress_timestamp_seconds")
        assert all(beats[r] > progress[r] for r in ("0", "1"))
        time.sleep(1.0)  # the heartbeats go on while both training threads are blocked
        later = per_rank(http_text(f"http://127.0.0.1:{port}/metrics"), "gradwatch_rank_heartbeat_timestamp_seconds")
        assert all(later[r] > beats[r] for r in ("0", "1"))
        assert per_rank(http_text(f"http://127.0.0.1:{port}/metrics"), "gradwatch_rank_progress_timestamp_seconds") == progress
        procs[1][0].send_signal(signal.SIGUSR1)  # faulthandler: the stuck rank's stacks, and it lives on
        log = tmp_path / "rank1.log"
        wait_for(lambda: "stuck_before_the_forward" in log.read_text(), 30, "rank 1's stack in its log")
        assert procs[1][0].poll() is None
    finally:
        stop(procs)


@pytest.mark.multiproc
def test_a_stalled_job_pages_naming_the_missing_rank_and_every_rank_dumps_its_stacks(tmp_path: Path, capsys):
    pager = Pager()
    ports = {"live-stalled": free_port(), "live-healthy": free_port()}
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    prom = prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports.values()])
    am = alertmanager(tmp_path, pager.url)
    stalled_dir, healthy_dir = tmp_path / "stalled", tmp_path / "healthy"
    with running(prom, am):
        agg = aggregator(tmp_path, prom.url, am.url, rules,
                         tmp_path / "state.db", token=TOKEN)
        with running(agg):
            common = dict(seconds_per_step=0.25, heartbeat_s=0.5, url=agg.url, token=TOKEN)
            stalled = start_ranks("stall", 2, stalled_dir, job="live-stalled", port=ports["live-stalled"], steps=1000,
                                  stall_step=STALL_STEP, stall_rank=1, out=str(stalled_dir), **common)
            healthy = start_ranks("stall", 2, healthy_dir, job="live-healthy", port=ports["live-healthy"], steps=120,
                                  linger=2, out=str(healthy_dir), **common)
            try:
                found = wait_for(lambda: pager.alerts("firing", alertname="GradwatchTrainingStalled", job="live-stalled"),
                                 120, "the stall page")
                page = min(found, key=lambda a: a["received"])
                stall_time = float((stalled_dir / "stall_time").read_text())
                assert {a["labels"]["rank"] for a in found} == {"1"}, [a["labels"] for a in found]  # the rank that did not arrive
                assert page["labels"]["severity"] == "critical" and page["receiver"] == "training-pager"
                assert "dump_stacks" in page["annotations"]["runbook"]
                waited = page["received"] - stall_time
                assert 8 <= waited < 60, waited  # not before min_seconds; within the rule's interval and Alertmanager's
                # the policy's dump_stacks: out of band, so it arrives while no rank steps
                for rank in (0, 1):
                    log = stalled_dir / f"rank{rank}.log"
                    wait_for(lambda: "Python stacks of every thread" in log.read_text(), 30, f"rank {rank}'s stacks")
                assert "stuck_before_the_forward" in (stalled_dir / "rank1.log").read_text()
                assert "DistributedDataParallel" in (stalled_dir / "rank0.log").read_text() or "backward" in (stalled_dir / "rank0.log").read_text()
                def acked_dumps():
                    request = urllib.request.Request(f"{agg.url}/api/v1/commands?job=live-stalled", headers={"Authorization": f"Bearer {TOKEN}"})
                    with urllib.request.urlopen(request, timeout=5) as r:
                        commands = json.loads(r.read())["commands"]
                    return [c for c in commands if c["spec"]["kind"] == "dump_stacks" and c["state"] == "acked"]

                dumps = wait_for(acked_dumps, 30, "dump_stacks acknowledged")
                assert all(c["source"] == "policy" and c["outcome"] == "applied" for c in dumps), dumps
                for proc, _ in healthy:
                    assert proc.wait(timeout=120) == 0
                time.sleep(3)  # a few evaluations after the healthy job ended normally
                assert pager.alerts(job="live-healthy") == [], pager.alerts(job="live-healthy")
                with capsys.disabled():
                    print(f"\nlive-stalled: GradwatchTrainingStalled paged {waited:.1f} s after rank 1 stopped "
                          f"(min_seconds 8 s), naming rank {page['labels']['rank']}")
            finally:
                stop(stalled)
                stop(healthy)
    pager.close()
