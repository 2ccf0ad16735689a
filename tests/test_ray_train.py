"""Ray Train: a real local Ray (2 CPUs), a TorchTrainer with 2 workers on gloo, the agent attached
through gradwatch.agent.integrations.ray_train. Both workers measure the same statistics, world
rank 0 alone serves metrics, and a command from a real aggregator applies on both workers at the
step it was acknowledged with."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import free_port
from servers import aggregator, running, wait_for
from test_commands import TOKEN, acked, submit

ray = pytest.importorskip("ray", reason="ray is an optional extra (gradwatch[ray]); not installed")
pytest.importorskip("ray.train.torch", reason="ray[train] is not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ray.py"


@pytest.fixture(scope="module")
def train_ray() -> Iterator[Any]:
    """One Ray session for the module, and the example loaded so the workers unpickle it by value."""
    spec = importlib.util.spec_from_file_location("gradwatch_example_train_ray", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        yield module
    finally:
        ray.shutdown()
        sys.modules.pop(spec.name, None)


def results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_ray_workers_measure_alike_rank0_exports_and_commands_apply_on_every_worker(tmp_path: Path, train_ray: Any):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    out.mkdir()
    job = "ray-commands"
    config = {"steps": 400, "seconds_per_step": 0.05, "stop_after_command": True, "out": str(out), "lr": 0.05,
              "gradwatch": {"job": job, "aggregator_url": base, "aggregator_token": TOKEN, "command_poll_s": 0.2,
                            "activation_every": 5}}
    dead = f"http://127.0.0.1:{free_port()}"
    with running(aggregator(tmp_path, dead, dead, None, tmp_path / "state.db", port=port, token=TOKEN)):
        trainer = train_ray.build_trainer(config, workers=2, storage_path=str(tmp_path / "ray"), name="gw-ray-test")
        with cf.ThreadPoolExecutor(1) as pool:
            fit = pool.submit(trainer.fit)
            wait_for(lambda: (out / "training").exists() or fit.done(), 150, "the Ray workers training")
            assert not fit.done(), fit.exception()
            command = acked(base, submit(base, job, {"kind": "scale_lr", "factor": 0.5, "reason": "ray test"}), timeout=60)
            result = fit.result(timeout=120)
    assert result.error is None, result.error
    r0, r1 = results(out)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)

    # identical statistics on both workers: the reduced packet is the same everywhere
    assert len(r0["history"]) == len(r1["history"]) > 5
    assert [h["grad_norm"] for h in r0["history"]] == [h["grad_norm"] for h in r1["history"]]
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    assert all(h["grad_norm"] > 0 for h in r0["history"])
    assert r0["params"] == r1["params"]

    # world rank 0 alone serves metrics, and they show this job's steps
    assert r0["metrics_port"] and r1["metrics_port"] is None and r1["scrape"] is None
    newest = r0["history"][-1]["published"]  # the newest step read (steps are combined across workers)
    assert len(r0["history"]) - 1 - newest < 16
    assert re.search(rf'^gradwatch_step{{job="{job}"}} {newest}(\.0)?$', r0["scrape"], re.M), r0["scrape"][:2000]

    # the command: acknowledged with a step, applied at that step on both workers, exactly once
    step = command["acked_step"]
    assert r0["commands"] == r1["commands"] == [[step, "scale_lr", 0.5, "applied"]]
    for r in (r0, r1):
        lrs = [h["lr"] for h in r["history"]]
        assert lrs[step - 1] == 0.05 and lrs[step] == pytest.approx(0.025) and lrs[-1] == pytest.approx(0.025)


def test_job_name_from_ray_experiment_is_a_valid_label():
    from gradwatch.agent import AgentConfig
    from gradwatch.agent.integrations.ray_train import job_name

    for experiment in ("TorchTrainer_2026-11-23_03-37-11", "my run (v2)", "x" * 300, ""):
        assert AgentConfig(job=job_name(experiment)).job  # accepted as a Prometheus label value
    assert job_name("my run (v2)") == "my_run__v2_"


def test_attach_outside_a_ray_train_worker_is_a_clear_error():
    import torch

    from gradwatch.agent.integrations.ray_train import attach

    with pytest.raises(RuntimeError, match="outside of a Ray Train training function"):
        attach(torch.nn.Linear(2, 1))
