"""Remediation commands end to end, real processes: the aggregator (token-protected API, SQLite) and
a 2-rank gloo job whose rank 0 polls it. Every command is applied on every rank at the same step,
acknowledged with that step, applied exactly once, and nothing bad (unauthenticated, malformed,
expired, replayed) is applied. Training never waits on the aggregator."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import free_port, launch
from servers import aggregator, running, wait_for

TOKEN = "s3cret-token-for-tests"


def call(url: str, method: str = "GET", body: Optional[dict] = None, token: Optional[str] = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def service(tmp: Path, port: int, state: Path):
    dead = f"http://127.0.0.1:{free_port()}"  # no Prometheus/Alertmanager needed for commands
    return aggregator(tmp, dead, dead, None, state, port=port, token=TOKEN)


def submit(base: str, job: str, body: dict) -> str:
    code, answer = call(f"{base}/api/v1/jobs/{job}/commands", "POST", body)
    assert code == 201, answer
    return answer["id"]


def acked(base: str, command_id: str, timeout: float = 30) -> dict:
    def done():
        cmds = {c["id"]: c for c in call(f"{base}/api/v1/commands")[1]["commands"]}
        return cmds[command_id] if cmds[command_id]["state"] != "pending" else None
    return wait_for(done, timeout, f"ack of {command_id}")


def changed_at(history: list[dict], key: str, start: int = 0) -> int:
    for prev, cur in zip(history[start:], history[start + 1:]):
        if cur[key] != prev[key]:
            return cur["step"]
    raise AssertionError(f"{key} never changed after step {start}")


@pytest.mark.multiproc
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_each_command_applies_on_every_rank_at_the_acknowledged_step(tmp_path: Path, wrap: str):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    job = f"team/cmd-{wrap}"  # a "/" in a job name works in every route
    state = tmp_path / "state.db"
    early = None
    agg = service(tmp_path, port, state)
    with running(agg):
        # before the job starts: one that expires unapplied, and the bad ones that are refused outright
        early = submit(base, job, {"kind": "scale_lr", "factor": 0.1, "ttl_s": 1, "reason": "too late"})
        assert call(f"{base}/api/v1/jobs/{job}/commands", "POST", {"kind": "scale_lr", "factor": 0.5}, token=None)[0] == 401
        assert call(f"{base}/api/v1/jobs/{job}/commands", "POST", {"kind": "scale_lr", "factor": 0.5}, token="wrong")[0] == 401
        for bad in ({"kind": "scale_lr", "factor": 2}, {"kind": "set_clip_norm", "max_norm": -1}, {"kind": "halt"},
                    {"kind": "skip_steps", "n": 0}, {"kind": "explode"}, {"kind": "scale_lr", "factor": 0.5, "extra": 1}):
            assert call(f"{base}/api/v1/jobs/{job}/commands", "POST", bad)[0] == 422, bad
        time.sleep(1.5)
        with cf.ThreadPoolExecutor(1) as pool:
            run = pool.submit(launch, "commands", 2, tmp_path / "job", timeout=240, wrap=wrap, job=job, url=base,
                              token=TOKEN, steps=110, seconds_per_step=0.1, out=str(tmp_path))
            wait_for(lambda: (tmp_path / "training-rank0").exists(), 120, "training under way")  # changes visible in the history
            ids = {}
            for name, body in (("scale_lr", {"kind": "scale_lr", "factor": 0.5, "reason": "test"}),
                               ("set_clip_norm", {"kind": "set_clip_norm", "max_norm": 1e-3}),
                               ("skip_steps", {"kind": "skip_steps", "n": 3}),
                               ("reset", {"kind": "reset"})):
                ids[name] = submit(base, job, body)
                acked(base, ids[name])
                if name == "skip_steps":  # reset cancels skips still to come: let all 3 happen first (~10 steps)
                    time.sleep(1.0)
            ranks = run.result()
        commands = {c["id"]: c for c in call(f"{base}/api/v1/commands?job={job}")[1]["commands"]}
        events = call(f"{base}/api/v1/audit?job={job}")[1]["events"]
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert [(h["lr"], h["clip"], h["skipped"], h["clipped"]) for h in h0] == [(h["lr"], h["clip"], h["skipped"], h["clipped"]) for h in h1]
    steps = {name: commands[i]["acked_step"] for name, i in ids.items()}
    assert all(commands[i]["state"] == "acked" for i in ids.values())
    assert changed_at(h0, "lr") == steps["scale_lr"] and h0[steps["scale_lr"]]["lr"] == pytest.approx(0.05)
    assert changed_at(h0, "clip") == steps["set_clip_norm"] and h0[steps["set_clip_norm"]]["clip"] == 1e-3
    assert h0[steps["set_clip_norm"]]["clipped"] > h0[steps["set_clip_norm"] - 1]["clipped"]  # clipped from that step
    skip = steps["skip_steps"]
    assert h0[skip + 2]["skipped"] - h0[skip - 1]["skipped"] == 3 and h0[-1]["skipped"] == 3
    reset = steps["reset"]
    assert reset > skip + 2, "reset arrived before the 3 skips were done: the test's pacing, not the agent"
    assert h0[reset]["lr"] == 0.1 and h0[reset]["clip"] is None and changed_at(h0, "lr", steps["scale_lr"]) == reset
    assert ranks[0]["final"] == ranks[1]["final"]  # bitwise identical parameters across ranks
    assert commands[early]["state"] == "expired" and all(h["lr"] in (0.1, 0.05) for h in h0)  # 0.1x never applied
    kinds = [(e["event"], e["detail"].get("kind")) for e in events]
    assert ("unauthorized", None) in kinds and ("expired", "scale_lr") in kinds
    assert [k for e, k in kinds if e == "applied"] == ["scale_lr", "set_clip_norm", "skip_steps", "reset"]


@pytest.mark.multiproc
def test_training_never_waits_on_the_aggregator_and_nothing_is_applied_twice(tmp_path: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "state.db"
    with cf.ThreadPoolExecutor(1) as pool:
        # the aggregator is not up when training starts
        run = pool.submit(launch, "commands", 2, tmp_path / "job", timeout=240, wrap="ddp", job="outage", url=base,
                          token=TOKEN, steps=120, seconds_per_step=0.1, out=str(tmp_path))
        wait_for(lambda: (tmp_path / "training-rank0").exists() or run.done(), 180, "training under way")  # start-up varies with load
        first = service(tmp_path, port, state)
        with running(first):
            applied = acked(base, submit(base, "outage", {"kind": "scale_lr", "factor": 0.5}))
        time.sleep(2.5)  # killed mid-run: training goes on
        second = service(tmp_path, port, state)
        with running(second):  # back with the same state: the acked command is not served again
            assert call(f"{base}/api/v1/jobs/outage/commands")[1]["commands"] == []
            again = acked(base, submit(base, "outage", {"kind": "scale_lr", "factor": 0.5}))
            repeat = call(f"{base}/api/v1/commands/{applied['id']}/ack", "POST", {"step": 1})  # a replayed ack
            assert repeat[0] == 200 and repeat[1]["acked_step"] == applied["acked_step"]
            ranks = run.result()
            # the job relaunched (as torchrun would after a failure): nothing already applied comes back
            relaunched = launch("commands", 2, tmp_path / "again", timeout=240, wrap="ddp", job="outage", url=base,
                                token=TOKEN, steps=30, seconds_per_step=0.1, out=str(tmp_path))
        assert {x["lr"] for x in relaunched[0]["history"]} == {0.1}
    h = ranks[0]["history"]
    lrs = [x["lr"] for x in h]
    first_at, second_at = applied["acked_step"], again["acked_step"]
    assert 3 < first_at < second_at, (first_at, second_at)  # both arrived mid-run
    # each applied exactly once, at its acknowledged step
    assert set(lrs[:first_at]) == {0.1} and set(lrs[first_at:second_at]) == {0.05} and set(lrs[second_at:]) == {0.025}
    seconds = ranks[0]["step_seconds"]
    assert max(seconds) < 0.5, max(seconds)  # never a network timeout inside a step
    assert statistics.median(seconds) < 0.05


@pytest.mark.multiproc
def test_halt_checkpoints_and_exits_with_a_distinct_code_on_every_rank(tmp_path: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(service(tmp_path, port, tmp_path / "state.db")), cf.ThreadPoolExecutor(1) as pool:
        run = pool.submit(launch, "commands", 2, tmp_path / "job", timeout=240, ok_codes=(86,), wrap="ddp", job="halt",
                          url=base, token=TOKEN, steps=300, seconds_per_step=0.1, out=str(tmp_path))
        time.sleep(4)
        sent = subprocess.run([sys.executable, "-m", "gradwatch.cli", "signal", "--job", "halt", "halt",
                               "--reason", "operator: bad data shard", "--aggregator-url", base],
                              env={**os.environ, "GRADWATCH_AGGREGATOR_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        cmd = acked(base, sent.stdout.split()[0])
        run.result()  # both ranks exited 86 (anything else fails launch)
    steps = {(tmp_path / f"halted-rank{r}").read_text() for r in range(2)}
    assert steps == {str(cmd["acked_step"])}  # the user's checkpoint callback ran on every rank, same step


@pytest.mark.multiproc
def test_exploding_regression_is_fixed_without_a_human(tmp_path: Path, capsys):
    """The unscaled regression (unscaled target, SGD lr 0.01) goes NaN at step ~11 untouched. With the loop closed -
    agent -> Prometheus -> aggregator rules -> policy -> command -> every rank - it trains to the end
    with a finite loss, and the audit log says which alert fired and which command fixed it, when.
    The first 16 steps take 2 s each so the loop (1 s scrape, 1 s evaluation, 0.2 s poll) can act
    before step 11; then the job runs at 0.25 s a step."""
    from servers import Pager, alertmanager, prometheus

    rules = tmp_path / "rules.yaml"
    rules.write_text("interval: 1s\nrules:\n  exploding_gradient: {window: 30s, for: 0s}\n  nan_gradient: {window: 10s}\n")
    metrics_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    pager = Pager()
    prom, am = prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"]), alertmanager(tmp_path, pager.url)
    with running(prom, am):
        agg = aggregator(tmp_path, prom.url, am.url, rules,
                         tmp_path / "state.db", port=port, token=TOKEN)
        with running(agg):
            ranks = launch("alerting", 2, tmp_path / "job", timeout=300, kind="exploding", job="unscaled-regression", port=metrics_port,
                           steps=60, seconds_per_step=2.0, slow_steps=16, fast_pace=0.25, url=base, token=TOKEN)
            events = call(f"{base}/api/v1/audit?job=unscaled-regression")[1]["events"]
            commands = {c["id"]: c for c in call(f"{base}/api/v1/commands?job=unscaled-regression")[1]["commands"]}
    pager.close()
    losses = ranks[0]["losses"]
    assert all(l == l and l != float("inf") for l in losses), losses  # finite to the end
    assert losses[-1] < losses[5]
    fixes = [(e["detail"]["alert"], commands[e["command"]]) for e in events if e["event"] == "policy"]
    assert fixes and fixes[0][0] == "exploding_gradient" and fixes[0][1]["spec"]["kind"] == "set_clip_norm"
    assert all(c["state"] == "acked" for _, c in fixes)
    with capsys.disabled():
        print()
        for alert, c in fixes:
            value = {k: v for k, v in c["spec"].items() if k in ("max_norm", "factor")}
            print(f"unscaled regression: {alert} fired -> policy sent {c['spec']['kind']} {value} -> applied on every rank at step {c['acked_step']}")
        print(f"unscaled regression: loss {losses[0]:.4g} at step 0, {max(losses):.4g} at worst, {losses[-1]:.4g} at step {len(losses) - 1}; "
              f"never non-finite (untouched, it is NaN by step 11)")


def test_a_command_that_arrives_as_training_ends_is_acknowledged_not_applied(tmp_path: Path):
    """Read from the last step's packet, a command would be applied at the start of the next step; there
    is none. close() acknowledges it as rejected, so the next run of the job is not served it."""
    import torch

    from gradwatch.agent import HealthAgent

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(service(tmp_path, port, tmp_path / "state.db")):
        command_id = submit(base, "ending", {"kind": "scale_lr", "factor": 0.5, "reason": "arrives late"})
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agent = HealthAgent(model, opt, job="ending", metrics_port=None, aggregator_url=base,
                            aggregator_token=TOKEN, command_poll_s=0.05)
        deadline = time.monotonic() + 30
        while not agent.remediation.pending:  # until a step's packet brought it; the next step() would apply it
            assert time.monotonic() < deadline, "the command never arrived"
            model(torch.randn(8, 4)).pow(2).mean().backward()
            agent.step(opt)
            opt.zero_grad()
            time.sleep(0.01)
        steps = agent.step_count
        agent.close()
        assert agent.commands_applied == [] and opt.param_groups[0]["lr"] == 0.1
        ack = acked(base, command_id)
        assert ack["state"] == "rejected" and ack["outcome"] == "rejected" and ack["acked_step"] == steps
        audit = call(f"{base}/api/v1/audit?job=ending")[1]
        assert any(e["command"] == command_id and e["event"] == "rejected" and "training ended" in e["detail"]["detail"]
                   for e in audit["events"]), audit
        assert call(f"{base}/api/v1/jobs/ending/commands")[1]["commands"] == []  # not served to a next run
