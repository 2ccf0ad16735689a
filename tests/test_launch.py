"""`gradwatch run`: the launcher and the opt-in zero-code attach, with real torchrun jobs (2 ranks,
gloo, CPU) running scripts that were not edited for gradwatch."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def gradwatch_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradwatch.cli", "run", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_") and k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample rank 0 serves, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def finish(proc: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.multiproc
@pytest.mark.parametrize("wrap, wrapper", [("ddp", "DistributedDataParallel"), ("fsdp2", "FSDPSequential")])
def test_auto_attach_measures_an_unmodified_script_and_guards_a_nan_step_on_every_rank(tmp_path: Path, wrap: str, wrapper: str):
    port = free_port()
    log = tmp_path / "job.log"
    cmd = gradwatch_run("--auto-attach", "--job", "plain", "--mode", "guard", "--metrics-port", str(port), "--",
                        *TORCHRUN, str(EXAMPLES / "train_unmodified.py"), "--steps", "40", "--nan-step", "5",
                        "--seconds-per-step", "0.15", "--out", str(tmp_path / "out"), *(["--fsdp2"] if wrap == "fsdp2" else []))
    job = (("job", "plain"),)
    seen: dict[tuple[str, tuple], float] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        while proc.poll() is None:  # scrape over HTTP while the job runs; keep the latest answer
            try:
                seen = scrape(port)
            except OSError:
                pass
            time.sleep(0.2)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"gradwatch: auto-attached to {wrapper} and SGD (job plain, mode guard" in text
    assert seen, f"rank 0 never served metrics on {port}\n{text[-4000:]}"
    # the script's 2nd optimizer step is the agent's step 0 (the 1st one happens before it attaches)
    assert seen[("gradwatch_step", job)] >= 30
    info = [labels for (name, labels) in seen if name == "gradwatch_agent_info"]
    assert [dict(labels)["sharding"] for labels in info] == [wrap]
    assert len([1 for (name, _) in seen if name == "gradwatch_layer_grad_norm"]) == 4  # the root: all 4 tensors
    assert seen[("gradwatch_loss", job)] > 0  # the loss is captured from backward(), unmodified script
    assert seen[("gradwatch_skipped_steps_total", (("job", "plain"), ("reason", "nonfinite")))] == 1
    assert "skipped step 4 on every rank" in text  # script step 5 = agent step 4
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["params"] == r1["params"]  # bitwise equal across ranks
    assert all(math.isfinite(v) for p in r0["params"] for v in p)  # the NaN batch never reached them


@pytest.mark.multiproc
def test_a_script_with_its_own_agent_is_not_instrumented_twice(tmp_path: Path):
    auto_jsonl = tmp_path / "auto.jsonl"  # where an auto-attached agent would write (the env's path)
    cmd = gradwatch_run("--auto-attach", "--metrics-port", str(free_port()), "--", *TORCHRUN, str(EXAMPLES / "train_ddp.py"),
                        "--healthy", "--epochs", "1", "--seconds-per-step", "0", "--out", str(tmp_path / "out"))
    done = subprocess.run(cmd, env=child_env(GRADWATCH_JSONL_PATH=str(auto_jsonl)), capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "the script attaches its own HealthAgent; auto-attach does nothing" in text
    # neither attached a second time nor failed trying (every auto-attach message starts "auto-attach")
    assert "auto-attached" not in text and "auto-attach:" not in text and "auto-attach failed" not in text \
        and "not attached" not in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_ddp.jsonl").read_text().splitlines()]
    assert steps == list(range(15))  # 15 optimizer steps, each measured once
    assert not auto_jsonl.exists()


@pytest.mark.multiproc
def test_an_attach_failing_on_one_rank_leaves_every_rank_training_unmonitored(tmp_path: Path):
    """The launcher validates the configuration, so break it behind its back on rank 1 only (a
    shadowed sitecustomize runs first): rank 0 builds its agent, rank 1 cannot; they agree, in one
    all-reduce, that neither measures, and the job ends normally instead of hanging."""
    user_site = tmp_path / "user_site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1':\n    os.environ['GRADWATCH_STATS_EVERY'] = '0'\n")
    cmd = gradwatch_run("--auto-attach", "--", *TORCHRUN, str(EXAMPLES / "train_unmodified.py"), "--steps", "6",
                        "--out", str(tmp_path / "out"))
    done = subprocess.run(cmd, env=child_env(PYTHONPATH=str(user_site)), capture_output=True, text=True, timeout=180)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "could not build the agent on rank 1" in text and "stats_every" in text
    assert "auto-attach failed on some rank; training goes on unmonitored on every rank" in text
    assert "auto-attached" not in text
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["params"] == r1["params"]


PROBE = textwrap.dedent("""
    import json, os, sys
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch
    json.dump({
        "env": {k: v for k, v in os.environ.items() if k.startswith("GRADWATCH_")},
        "patched": [hasattr(DDP.__init__, "__wrapped__"), hasattr(torch.Tensor.backward, "__wrapped__")],
        "gradwatch_loaded": sorted(m for m in sys.modules if m.startswith("gradwatch")),
        "user_site": os.environ.get("USER_SITE_RAN"),
    }, open(os.path.join(sys.argv[1], "probe-" + os.environ.get("RANK", "x") + ".json"), "w"))
""")


def probe(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    return out


@pytest.mark.multiproc
def test_without_auto_attach_every_rank_gets_the_config_and_nothing_is_patched(tmp_path: Path):
    out = probe(tmp_path, "plain")
    cmd = gradwatch_run("--job", "team/run-7", "--mode", "guard", "--metrics-port", "9555", "--",
                        *TORCHRUN, str(tmp_path / "probe.py"), str(out))
    done = subprocess.run(cmd, env=child_env(GRADWATCH_ACTIVATION_EVERY="3"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((out / f"probe-{rank}.json").read_text())
        assert seen["env"] == {"GRADWATCH_JOB": "team/run-7", "GRADWATCH_MODE": "guard", "GRADWATCH_METRICS_PORT": "9555",
                               "GRADWATCH_ACTIVATION_EVERY": "3"}
        assert seen["patched"] == [False, False] and seen["gradwatch_loaded"] == []


def test_auto_attach_patches_rank_processes_and_chains_an_existing_sitecustomize(tmp_path: Path):
    out = probe(tmp_path, "auto")
    user_site = tmp_path / "user_site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITE_RAN'] = 'yes'\n")
    env = child_env(RANK="0", WORLD_SIZE="1", PYTHONPATH=str(user_site))
    done = subprocess.run(gradwatch_run("--auto-attach", "--", sys.executable, str(tmp_path / "probe.py"), str(out)),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads((out / "probe-0.json").read_text())
    assert seen["patched"] == [True, True] and "gradwatch.agent.integrations.autoattach" in seen["gradwatch_loaded"]
    assert seen["user_site"] == "yes"  # the user's own sitecustomize still ran


def test_the_exit_status_and_signals_are_the_commands(tmp_path: Path):
    assert subprocess.run(gradwatch_run("--", sys.executable, "-c", "import sys; sys.exit(7)"), env=child_env(),
                          timeout=120).returncode == 7
    waits = "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\nprint(os.getpid(), flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen(gradwatch_run("--", sys.executable, "-c", waits), env=child_env(), stdout=subprocess.PIPE, text=True)
    assert int(proc.stdout.readline()) == proc.pid  # exec: the launcher *is* the command, nothing in between
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, 30) == 42
    proc.stdout.close()


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "missing the command to run"),
    (["--job", "bad job"], {}, "job='bad job' must be"),
    (["--metrics-port", "70000"], {}, "metrics_port"),
    ([], {"GRADWATCH_STATS_EVERY": "0"}, "stats_every"),
    (["--aggregator", "http://127.0.0.1:9"], {}, "needs GRADWATCH_AGGREGATOR_TOKEN"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path: Path, args: list, env: dict, message: str):
    marker = tmp_path / "ran"
    command = ["--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"] if args or env else []
    done = subprocess.run(gradwatch_run(*args, *command), env=child_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not marker.exists()


def test_a_missing_command_is_named():
    done = subprocess.run(gradwatch_run("--", "no-such-trainer-xyz"), env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 127 and "command not found: no-such-trainer-xyz" in done.stderr


def test_a_command_that_cannot_be_executed_is_named(tmp_path: Path):
    """Executable bit set, but no shebang and not a binary: execve fails with ENOEXEC; one line and
    126 (as a shell does), not a traceback."""
    bogus = tmp_path / "not-a-program"
    bogus.write_bytes(b"\x00\x01\x02 not a program\n")
    bogus.chmod(0o755)
    done = subprocess.run(gradwatch_run("--", str(bogus)), env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 126, done.stderr
    assert f"cannot execute {bogus}: Exec format error" in done.stderr and "Traceback" not in done.stderr


def test_sitecustomize_is_package_data_found_through_importlib_resources(tmp_path: Path):
    from gradwatch.agent.integrations import launch

    found = launch.site_dir()
    assert (found / "sitecustomize.py").is_file() and found.parent.name == "integrations"
    # A wheel built from the source tree carries it (a non-editable install has no repo to fall back on).
    tomllib = pytest.importorskip("tomllib")
    src = tmp_path / "src"
    for part in set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gradwatch-*.whl")
    assert "gradwatch/agent/integrations/autoattach_site/sitecustomize.py" in zipfile.ZipFile(wheel).namelist()


def test_auto_attach_closes_its_agent_when_the_agreement_fails(monkeypatch, capsys):
    """The one all-reduce that agrees on attaching raises (a broken group): the agent already built
    is closed (its metrics port freed, its hooks gone), nothing is routed, training goes on."""
    import socket
    import weakref

    import torch

    from gradwatch.agent import HealthAgent
    from gradwatch.agent.integrations import autoattach

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(autoattach, "_models", [weakref.ref(model)])
    monkeypatch.setenv("GRADWATCH_METRICS_PORT", "0")
    ports: list = []
    real_close = HealthAgent.close
    monkeypatch.setattr(HealthAgent, "close", lambda self: (ports.append(self.metrics_port), real_close(self)))

    def broken_group(ok: bool) -> bool:
        raise RuntimeError("Connection reset by peer")  # what gloo raises when a peer died

    monkeypatch.setattr(autoattach, "_all_ranks_ok", broken_group)
    autoattach._decide(opt)
    assert len(ports) == 1 and ports[0]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2).close()  # the port is free again
    assert getattr(opt, "_gradwatch_raw_step", None) is None and autoattach._state["agent"] is None
    assert not any(m._forward_hooks for m in model.modules())
    assert "training goes on unmonitored on every rank" in capsys.readouterr().err
