"""torch.compile with the agent attached and activation statistics on: the hooks are traced into the
model's graph once, and report what the eager hooks report.

Inductor (torch.compile's default backend, what users run) where the statistics and the NaN origin are
compared with the eager run's; on this 2-core CPU a cold compile of the tiny model takes about 25 s (the
NaN test then reuses inductor's cache). The rest (eager and compiled hooks in one forward, the unit cap,
fail-open) is Dynamo's doing (what is traced, guarded, replayed), not the backend's, so it uses aot_eager,
which skips inductor's code generation.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Optional

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from gradwatch.agent import HealthAgent, activations
from gradwatch.agent.stats import ActivationStats
from training_fixtures import dead_and_saturated

FIELDS = ("mean", "std", "max_abs", "nonfinite", "saturated_ratio", "dead_ratio")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def seeded_model() -> nn.Sequential:
    torch.manual_seed(0)
    return dead_and_saturated()


def batch(step: int, features: int) -> torch.Tensor:
    return torch.randn(16, features, generator=torch.Generator().manual_seed(step))


def train(model: nn.Module, steps: int, compile_with: Optional[str], poison: Optional[Callable[[int], None]] = None,
          lr: float = 1e-2, features: int = 12, **settings) -> tuple[HealthAgent, dict[int, ActivationStats]]:
    """`steps` SGD steps with the agent attached to `model` (compiled whole if `compile_with` names a
    backend); each sampled step's activation statistics. `poison(step)` runs before the step's forward."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    net = torch.compile(model, backend=compile_with) if compile_with else model
    agent = HealthAgent(net, opt, metrics_port=None, activation_every=10, **settings)
    sampled = {}
    for step in range(steps):
        if poison is not None:
            poison(step)
        loss = net(batch(step, features)).square().mean()
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        st = agent.last_stats  # one process: every measured step is read at its own step
        if st is not None and st.step == step and st.activations is not None:
            sampled[step] = st.activations
    agent.close()
    return agent, sampled


def compiled_once() -> None:
    assert dict(counters["frames"]) == {"total": 1, "ok": 1}
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and sum(counters["recompiles"].values()) == 0


def test_a_compiled_model_compiles_once_and_reports_the_eager_statistics():
    """100 steps, statistics sampled every 10: the sampling flag flips 20 times, the dead-unit layout is
    agreed at step 0 and used from step 10, and none of it recompiles (a recompile would raise)."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        agent, compiled = train(seeded_model(), 100, "inductor")
    compiled_once()
    assert agent._acts.traced
    _, eager = train(seeded_model(), 100, None)
    assert sorted(compiled) == sorted(eager) == list(range(0, 100, 10))
    for step, stats in compiled.items():
        ref = eager[step]
        assert stats.modules == ref.modules == ("0", "1", "2", "3", "4", "5", "6", "7")
        assert (stats.dead_ratio is None) == (ref.dead_ratio is None) == (step == 0)  # from the second sampled step
        for field in FIELDS:
            got, want = getattr(stats, field), getattr(ref, field)
            if want is None:
                continue
            for module, g, w in zip(stats.modules, got, want):
                assert g == pytest.approx(w, rel=1e-5, abs=1e-9), f"step {step} module {module} {field}: compiled {g}, eager {w}"
    # not trivially zero: the ReLU's four dead units, the tanh's saturated inputs
    assert all(s.dead_ratio[2] >= 4 / 32 for step, s in compiled.items() if step)
    assert all(s.saturated_ratio[4] > 0 for s in compiled.values())


def test_a_nan_in_an_activation_is_found_under_compile():
    """A NaN weight in Linear "3" from step 5 (an unmeasured step with stats_every=4): its output is the first
    non-finite one, although later steps' forwards make every module non-finite before step 8 reads the
    sentinel. The forward positions are counted on the device, without a recompile."""

    def poison_for(model: nn.Module) -> Callable[[int], None]:
        def poison(step: int) -> None:
            if step == 5:
                with torch.no_grad():
                    model[3].weight[0, 0] = float("nan")
        return poison

    origins = []
    for backend in ("inductor", None):
        model = seeded_model()
        with torch._dynamo.config.patch(error_on_recompile=True):
            agent, _ = train(model, 10, backend, poison_for(model), stats_every=4)
        o = agent.nan_origin
        origins.append((o.step, o.kind, o.layer, o.ranks))
    compiled_once()
    assert origins[0] == origins[1] == (8, "activation", "3", (0,))


def test_every_hook_has_code_objects_of_its_own():
    """Dynamo keeps compiled code per code object. A hook it compiles as a frame of its own (when its caller is
    not traced: torch.nn's own forwards reached from DDP's) would otherwise share one cache, and its limit of 8
    entries, with every other module's hook; so would the traced statistics it calls."""
    model = seeded_model()
    monitor = activations.ActivationMonitor(model, torch.device("cpu"), 128)
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    traces = [h.__closure__[h.__code__.co_freevars.index("trace")].cell_contents for h in hooks]
    monitor.close()
    assert len(hooks) == 8
    assert len({id(h.__code__) for h in hooks}) == len({id(t.__func__.__code__) for t in traces}) == 8


class Block(nn.Module):
    """A block with a forward of the user's own, compiled on its own as users compile blocks (Dynamo does not
    compile torch.nn's own forwards as frames: `nn.Sequential(...).compile()` would compile nothing)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_compiled_and_eager_hooks_share_one_forward_order():
    """Only the tail (modules 5-7) compiled: a NaN from the eager Linear "3" must not be outranked by the
    compiled tail's hooks, which count forward positions on the device, so the eager hooks count there too."""
    body = seeded_model()
    model = nn.Sequential(*list(body)[:5], Block(list(body)[5:]))
    model[5].compile(backend="aot_eager")

    def poison(step: int) -> None:
        if step == 3:
            with torch.no_grad():
                model[3].weight[0, 0] = float("nan")

    with torch._dynamo.config.patch(error_on_recompile=True):
        agent, _ = train(model, 5, None, poison)
    compiled_once()
    assert agent._acts.traced and agent._acts.names[-3:] == ("5.layers.0", "5.layers.1", "5.layers.2")
    assert (agent.nan_origin.step, agent.nan_origin.kind, agent.nan_origin.layer) == (3, "activation", "3")


def test_a_traced_hook_that_fails_switches_activations_off_and_training_goes_on(monkeypatch, caplog):
    """A hook failing inside the traced code (a stand-in for any error while Dynamo traces it): the error is
    caught in the graph, reported at the step's fill naming the module, activations switched off; the
    gradient statistics and the training go on (dropping the hooks recompiles the model once)."""

    def broken(output: object) -> None:
        raise RuntimeError("injected: this output cannot be traced")

    monkeypatch.setattr(activations, "_first_tensor", broken)
    model = seeded_model()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        agent, sampled = train(model, 20, "aot_eager")
    assert agent.step_count == 20 and agent.last_stats.step == 19 and math.isfinite(agent.last_stats.grad_norm)
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    assert agent._acts is None and sampled == {}
    assert counters["stats"]["unique_graphs"] == 2  # the hooked graph, then the model's own once they are removed
    assert agent.state.errors_total["activations"] >= 1 and agent.state.errors_total["stats"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("module '0' under torch.compile" in m and "injected" in m for m in messages), messages


def test_dead_units_under_compile_are_counted_over_the_first_traced_units():
    """A module with more than TRACED_UNITS (1024) units: its compiled hooks report the dead fraction over the
    first 1024 (the traced buffer is sized before the ranks agree on any layout); eager hooks over all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1536), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(100.0)  # alive everywhere...
        for dead in (slice(0, 256), slice(1024, 1536)):  # ...but these: zero output for every sample
            model[0].weight[dead] = 0.0
            model[0].bias[dead] = 0.0
    assert activations.TRACED_UNITS == 1024
    dead = {}
    for backend in ("aot_eager", None):
        _, sampled = train(copy.deepcopy(model), 11, backend, lr=0.0, features=4)
        dead[backend] = sampled[10].dead_ratio
    assert dead["aot_eager"] == [256 / 1024, 256 / 1024]
    assert dead[None] == [768 / 1536, 768 / 1536]


def test_a_dtensor_output_cannot_be_traced_and_fails_open(tmp_path, caplog):
    """A tensor-parallel Linear whose output stays a DTensor: the traced statistics cannot mix it with the
    agent's plain buffers, so the hook refuses it (named, in the log) instead of failing the compile; the
    model trains on, activations off (as they go off in eager mode, where the hooks fail on it too)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 4))
        parallelize_module(model, init_device_mesh("cpu", (1,)), {"0": ColwiseParallel(use_local_output=False), "1": RowwiseParallel()})
        with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
            agent, sampled = train(model, 12, "aot_eager")
    finally:
        dist.destroy_process_group()
    assert agent.step_count == 12 and agent.last_stats.step == 11 and agent._acts is None and sampled == {}
    messages = [r.getMessage() for r in caplog.records]
    assert any("module '0' under torch.compile" in m and "not DTensor" in m for m in messages), messages
