"""Shared fixtures: launch real multi-process gloo jobs the way torchrun does (env:// rendezvous,
one OS process per rank) and collect each rank's JSON result. A hang is killed by a timeout and
reported with every rank's output, instead of freezing the suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(scenario: str, world_size: int, out_dir: Path, **params: Any) -> list[tuple[subprocess.Popen, Any]]:
    """One process per rank, env:// rendezvous on a free port; each rank's output in rank<N>.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        }
        log = (out_dir / f"rank{rank}.log").open("w")
        cmd = [sys.executable, str(WORKER), scenario, str(out_dir), json.dumps(params)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def launch(scenario: str, world_size: int, out_dir: Path, timeout: float = 180, ok_codes: tuple = (0,), **params: Any) -> list[dict]:
    procs = start_ranks(scenario, world_size, out_dir, **params)
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            code = "timeout (hung?)"
        log.close()
        if code not in ok_codes:
            failed.append((rank, code))
    if failed:
        logs = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-4000:] for r in range(world_size))
        pytest.fail(f"{scenario} on {world_size} ranks failed: {failed}\n{logs}")
    return [json.loads(path.read_text()) if (path := out_dir / f"rank{r}.json").exists() else {"exit": "no result"} for r in range(world_size)]


@pytest.fixture
def run_ranks(tmp_path: Path) -> Callable[..., list[dict]]:
    counter = iter(range(1000))

    def run(scenario: str, world_size: int, **params: Any) -> list[dict]:
        return launch(scenario, world_size, tmp_path / f"{scenario}-{next(counter)}", **params)

    return run

# The test helpers (training_fixtures) sit beside the tests; importlib mode keeps this folder off sys.path.
sys.path.insert(0, str(Path(__file__).parent))
