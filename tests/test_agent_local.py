"""The agent in one process: configuration, layer plans, the textbook faults, AMP, the no-sync rule, sinks."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch.agent import AgentConfig, HealthAgent
from gradwatch.agent.layers import clean_name, group_layers
from training_fixtures import mixed_mlp, sigmoid_stack


def train(agent: HealthAgent, model: nn.Module, opt: torch.optim.Optimizer, steps: int, features: int = 12) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, features)).pow(2).mean()
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, field",
    [({"activation_every": -1}, "activation_every"), ({"stats_every": 0}, "stats_every"),
     ({"max_layers": 0}, "max_layers"), ({"metrics_port": 70000}, "metrics_port"),
     ({"job": "has space"}, "job"), ({"mode": "guardx"}, "mode"), ({"unknown_knob": 1}, "unknown_knob")],
)
def test_bad_config_values_are_rejected_with_the_field_named(bad, field):
    with pytest.raises(ValidationError) as err:
        AgentConfig(**bad)
    assert field in str(err.value)


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("GRADWATCH_JOB", "from-env")
    monkeypatch.setenv("GRADWATCH_ACTIVATION_EVERY", "3")
    config = AgentConfig()
    assert (config.job, config.activation_every) == ("from-env", 3)
    monkeypatch.setenv("GRADWATCH_STATS_EVERY", "often")
    with pytest.raises(ValidationError, match="stats_every"):
        AgentConfig()


def test_bad_config_at_construction_leaves_the_model_untouched():
    model = mixed_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValidationError):
        HealthAgent(model, torch.optim.SGD(model.parameters(), lr=0.1), activation_every=-5)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- layer plan ----------------------------------------------------------------------------------


def test_wrapper_prefixes_are_stripped():
    assert clean_name("module._orig_mod.encoder.0._fsdp_wrapped_module.weight") == "encoder.0.weight"


def test_layer_depth_groups_and_the_cap_coarsens():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(5)])
    names = [n for n, _ in model.named_parameters()]
    assert len(group_layers(names, None, 256)[0]) == 20
    assert group_layers(names, 1, 256)[0] == ["0", "1", "2", "3", "4"]
    assert len(group_layers(names, 2, 256)[0]) == 10
    capped, _ = group_layers(names, None, 6)  # 20 tensors, 10 modules, 5 blocks -> blocks
    assert capped == ["0", "1", "2", "3", "4"]
    tiny, layer_of_param = group_layers(names, None, 3)  # even the blocks exceed it: contiguous chunks
    assert len(tiny) <= 3 and len(layer_of_param) == 20


def test_no_trainable_parameters_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HealthAgent(model, None, metrics_port=None)


# ---- the textbook faults -----------------------------------------------------------------------------------


def test_sigmoid_stack_first_layer_gradient_far_below_last():
    torch.manual_seed(0)
    net = sigmoid_stack()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    agent = HealthAgent(net, opt, metrics_port=None, layer_depth=1)  # one layer per block
    x = torch.randn(5, 50)
    pre = [net[0][0](x)]
    for block in net[1:]:
        pre.append(block[0](torch.sigmoid(pre[-1])))
    loss = net(x).sum()
    loss.backward()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    ref_first = math.hypot(float(linears[0].weight.grad.norm()), float(linears[0].bias.grad.norm()))
    ref_last = math.hypot(float(linears[-1].weight.grad.norm()), float(linears[-1].bias.grad.norm()))
    agent.step(opt, loss=loss)
    st = agent.last_stats
    agent.close()
    assert st.layers == tuple(str(i) for i in range(10))
    first, last = st.layer_grad_norm[0], st.layer_grad_norm[-1]
    assert first == pytest.approx(ref_first, rel=1e-5) and last == pytest.approx(ref_last, rel=1e-5)
    # This network gives about an order of magnitude here (median 10x over 20 seeds), not 100x.
    assert last / first > 3
    # saturation: the fraction of each sigmoid's inputs beyond smdebug's (-23, 16.99999) limits
    ratios = dict(zip(st.activations.modules, st.activations.saturated_ratio))
    for i, z in enumerate(pre):
        expected = float(((z < -23) | (z > 16.99999)).float().mean())
        assert ratios[f"{i}.1"] == pytest.approx(expected)
    assert any(ratios[f"{i}.1"] > 0 for i in range(10))


# ---- AMP, accumulation, the hot-path rules -------------------------------------------------------


def test_amp_statistics_are_of_unscaled_gradients():
    torch.manual_seed(0)
    model = mixed_mlp()
    ref = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    agent = HealthAgent(model, opt, metrics_port=None)
    x = torch.randn(8, 12)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    # reference: the same gradient without scaling
    ref_model = mixed_mlp()
    with torch.no_grad():
        for p, r in zip(ref_model.parameters(), ref):
            p.copy_(r)
    ref_model(x).pow(2).mean().backward()
    agent.step(opt, loss=loss, scaler=scaler)
    scaler.update()
    expected = [float(p.grad.norm()) for p in ref_model.parameters()]
    assert agent.last_stats.layer_grad_norm == pytest.approx(expected, rel=1e-5)
    assert agent.last_stats.layer_weight_norm == pytest.approx([float(r.norm()) for r in ref], rel=1e-6)
    agent.close()


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (.item(), float(t), bool(t)): each is a sync on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_step_reads_no_scalar_per_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)], nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=1, update_ratio_every=1)
    for _ in range(3):
        loss = model(torch.randn(4, 16)).sum()
        loss.backward()
        with _ScalarReads() as reads:
            agent.step(opt, loss=loss)
        opt.zero_grad()
        assert reads.count == 0  # the one sync is a bulk copy of the stats buffer, not scalar reads
    assert agent.counters.host_syncs == 3 and agent.counters.collectives == 0
    agent.close()


def test_stats_every_skips_unmeasured_steps_but_keeps_the_nan_sentinel():
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = HealthAgent(model, opt, metrics_port=None, stats_every=4, activation_every=100, update_ratio_every=0)
    for step in range(8):
        x = torch.randn(8, 12)
        if step == 5:
            x[0, 0] = float("nan")  # between measurements (steps 0 and 4 ... 8)
        model(x).sum().backward()
        agent.step(opt)
        opt.zero_grad()
    assert agent.counters.host_syncs == 2 + 0  # steps 0 and 4 measured; step 8 not reached yet
    loss = model(torch.randn(8, 12)).sum()
    loss.backward()
    agent.step(opt, loss=loss)
    assert agent.nan_origin is not None and agent.nan_origin.layer == "0"
    assert agent.nan_origin.step == 8  # reported at the next measured step
    agent.close()


def test_mode_off_is_a_plain_optimizer_step():
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = HealthAgent(model, opt, mode="off", metrics_port=None)
    before = [p.detach().clone() for p in model.parameters()]
    train(agent, model, opt, 2)
    assert agent.last_stats is None and agent.counters.host_syncs == 0
    assert agent.step_count == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(m._forward_hooks for m in model.modules())


def test_eval_forward_passes_do_not_count_as_training_activations():
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=1)
    with torch.no_grad():
        model(torch.full((8, 12), float("nan")))  # evaluation: ignored
    train(agent, model, opt, 1)
    assert agent.nan_origin is None
    agent.close()


def test_jsonl_sink_writes_every_measured_step_with_nonfinite_values_kept(tmp_path):
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "stats" / "run.jsonl"
    agent = HealthAgent(model, opt, metrics_port=None, jsonl_path=path)
    train(agent, model, opt, 3)
    loss = model(torch.randn(8, 12)).mean() * float("inf")
    loss.backward()
    agent.step(opt, loss=loss)
    agent.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["layers"][0] == "0.weight" and len(rows[0]["layer_grad_norm"]) == len(rows[0]["layers"])
    assert math.isnan(rows[3]["grad_norm"]) or math.isinf(rows[3]["grad_norm"])
    assert rows[3]["nan_origin"]["kind"] in ("activation", "loss")


def test_a_busy_metrics_port_loses_only_the_endpoint(caplog, tmp_path):
    """Each output fails open alone: with the port taken, the JSON lines file still gets every
    step and the in-process rules still page the NaN (one flag once silenced all three)."""
    import socket

    from gradwatch.aggregator.rules import parse_rules

    rules = parse_rules("interval: 1s\nrules:\n  nan_gradient: {window: 10s}\n")
    path = tmp_path / "run.jsonl"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        model = mixed_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        agent = HealthAgent(model, opt, job="busy", metrics_port=port, metrics_addr="127.0.0.1", jsonl_path=path)
        seen = []
        agent.watch_rules(rules, on_alert=seen.append)
        for step in range(8):  # a NaN loss from step 3: leaves several 1 s evaluations after it
            loss = model(torch.randn(8, 12)).pow(2).mean() * (float("nan") if step >= 3 else 1.0)
            loss.backward()
            agent.step(opt, loss=loss)
            opt.zero_grad()
            time.sleep(0.4)
        agent.flush()
        agent.close()
    assert agent.metrics is None and agent.state.errors_total["metrics"] == 1
    assert sum(agent.state.errors_total.values()) == 1  # nothing else failed
    assert sum("metrics failed" in r.getMessage() for r in caplog.records) == 1
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(8))
    firing = [c.alert for c in seen if c.after == "firing"]
    assert [a.labels["alertname"] for a in firing] == ["GradwatchNanGradient"], [a.labels for a in firing]
    assert firing[0].labels["job"] == "busy"


def test_packet_max_transport_keeps_inf_and_nan_non_finite(tmp_path):
    import torch.distributed as dist

    from gradwatch.agent.packet import Combined, Counters, Entry, Packet, Reduce

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        packet = Packet([Entry("m", Reduce.MAX, 3), Entry("s", Reduce.SUM, 1)], torch.device("cpu"))
        packet.put("m", torch.tensor([float("inf"), float("nan"), 2.0]))
        counters = Counters()
        host = Combined([packet], None, 2, counters).to_host(counters)[0]  # world_size>1: the collectives are really issued
    finally:
        dist.destroy_process_group()
    assert host["m"] == [float("inf"), float("inf"), 2.0]
    assert counters.collectives == 2 and counters.host_syncs == 1


def test_combined_packets_of_different_specs_travel_in_two_collectives_and_one_copy(tmp_path):
    """Steps with different specs (a detail step has MAX entries, a plain one none) combine: one
    all-reduce per op over all of them, the reduced values back in each step's own entries."""
    import torch.distributed as dist

    from gradwatch.agent.packet import Combined, Counters, Entry, Packet, Reduce

    plain = [Entry("s", Reduce.SUM, 2), Entry("l", Reduce.LOCAL, 1)]
    detail = plain + [Entry("m", Reduce.MAX, 2)]
    packets = [Packet(spec, torch.device("cpu")) for spec in (plain, detail, plain)]
    for i, packet in enumerate(packets):
        packet.put("s", torch.tensor([i, 10.0 * i]))
        packet.put("l", torch.tensor([-i]))
    packets[1].put("m", torch.tensor([float("nan"), 5.0]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counters = Counters()
        hosts = Combined(packets, None, 2, counters).to_host(counters)
    finally:
        dist.destroy_process_group()
    assert counters.collectives == 2 and counters.host_syncs == 1
    assert hosts == [{"s": [0.0, 0.0], "l": [0.0]},
                     {"s": [1.0, 10.0], "m": [float("inf"), 5.0], "l": [-1.0]},
                     {"s": [2.0, 20.0], "l": [-2.0]}]


def test_publisher_drops_the_oldest_when_behind_and_still_flushes():
    """A sink that falls behind loses the oldest steps (counted), never blocks submit, and flush()
    still completes: a dropped step is done with, not waited for."""
    import threading

    from gradwatch.agent.publisher import Publisher

    release, got = threading.Event(), []

    def slow_sink(stats):
        release.wait(5)
        got.append(stats)

    publisher = Publisher({"slow": slow_sink}, on_error=lambda *_: None, maxsize=4)
    for i in range(20):
        publisher.submit(i)  # type: ignore[arg-type]
    release.set()
    assert publisher.flush(timeout=5)
    assert publisher.dropped >= 20 - 4 - 1 and got[-1] == 19
    assert len(got) + publisher.dropped == 20
    publisher.close()


def test_a_publisher_without_sinks_queues_nothing():
    from gradwatch.agent.publisher import Publisher

    publisher = Publisher({}, on_error=lambda *_: None, maxsize=4)
    publisher.submit(1)  # type: ignore[arg-type]
    assert publisher._queue.qsize() == 0
    publisher.close()


def test_packet_reused_for_the_same_spec_starts_from_zero():
    from gradwatch.agent.packet import Combined, Counters, Entry, Packet, Reduce

    packet = Packet([Entry("s", Reduce.SUM, 2), Entry("l", Reduce.LOCAL, 1), Entry("m", Reduce.MAX, 1)], torch.device("cpu"))
    packet.put("s", torch.tensor([1.0, 2.0]))
    packet.put("l", torch.tensor([3.0]))
    packet.put("m", torch.tensor([4.0]))
    assert Combined([packet], None, 1, Counters()).to_host(Counters()) == [{"s": [1.0, 2.0], "m": [4.0], "l": [3.0]}]
    packet.clear()
    assert Combined([packet], None, 1, Counters()).to_host(Counters()) == [{"s": [0.0, 0.0], "m": [0.0], "l": [0.0]}]


def test_float64_model_is_measured():
    torch.manual_seed(0)
    model = mixed_mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = HealthAgent(model, opt, metrics_port=None)
    loss = model(torch.randn(8, 12, dtype=torch.float64)).pow(2).mean()
    loss.backward()
    expected = [float(p.grad.norm()) for p in model.parameters()]
    agent.step(opt, loss=loss)
    assert agent.last_stats.layer_grad_norm == pytest.approx(expected, rel=1e-9)
    agent.close()


def test_amp_overflow_is_not_a_nan_origin():
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled gradients overflow
    agent = HealthAgent(model, opt, metrics_port=None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(8, 12)).pow(2).sum() + 10  # > 2 times the scale: +inf once scaled
    scaler.scale(loss).backward()
    agent.step(opt, loss=loss, scaler=scaler)
    scaler.update()
    assert agent.last_stats.extra.get("amp_overflow") is True
    assert agent.nan_origin is None and agent.state.nonfinite_steps_total == 0
    assert agent.state.skipped_steps_total["amp_overflow"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # GradScaler skipped it
    agent.close()


def test_activation_std_is_precise_for_a_large_mean():
    model = nn.Sequential(nn.Linear(4, 256))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(100.0 + 0.01 * torch.randn(256))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=1)
    out = model(torch.randn(8, 4))
    expected = float(out.detach().double().std(unbiased=False))
    out.sum().backward()
    agent.step(opt)
    assert agent.last_stats.activations.std[0] == pytest.approx(expected, rel=1e-6)
    agent.close()


def test_embedded_rules_raise_alerts_in_process_with_layer_labels():
    """The in-process evaluator over the agent's own series (no Prometheus): the unscaled regression
    explodes, then goes NaN; both alerts fire, each naming where."""
    from gradwatch.aggregator.rules import parse_rules
    from training_fixtures import regression_data, unscaled_regression_model

    rules = parse_rules("interval: 1s\nrules:\n  exploding_gradient: {window: 30s, for: 0s}\n  nan_gradient: {window: 10s}\n")
    x, y = regression_data()
    model = unscaled_regression_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = HealthAgent(model, opt, job="embedded", metrics_port=None, activation_every=1)
    seen = []
    watcher = agent.watch_rules(rules, on_alert=seen.append)
    for step in range(18):  # NaN from about step 11: leaves several 1 s evaluations after it
        started = time.time()
        loss = nn.functional.mse_loss(model(x[step * 64:(step + 1) * 64]), y[step * 64:(step + 1) * 64])
        loss.backward()
        agent.step(opt, loss=loss)
        opt.zero_grad()
        time.sleep(max(0.0, 0.5 - (time.time() - started)))
    agent.flush()
    agent.close()
    firing = [c.alert for c in seen if c.after == "firing"]
    assert watcher.history == seen
    exploding = [a for a in firing if a.labels["alertname"] == "GradwatchExplodingGradient"]
    nan = [a for a in firing if a.labels["alertname"] == "GradwatchNanGradient"]
    assert exploding and all(a.labels["job"] == "embedded" for a in exploding)
    assert {a.labels.get("layer") for a in exploding} <= set(agent.layers) | {None}
    assert len(nan) == 1, [c.alert.labels for c in seen]
    assert nan[0].labels["layer"] == agent.nan_origin.layer and nan[0].labels["rank"] == "all"


def test_amp_overflow_gradients_do_not_count_as_rank_nonfinite():
    """GradScaler skips an overflow step itself: it must not page as a NaN (the NaN rule reads
    gradwatch_rank_nonfinite), while a real non-finite loss still counts."""
    from gradwatch.agent.exporter import AgentState, StatsCollector
    from gradwatch.agent.stats import RankStats, StepStats

    def rank_nonfinite(extra: dict, loss_bad: bool) -> float:
        state = AgentState("amp", 1, "none", "0")
        st = StepStats(step=1, time=0.0, world_size=1, layers=("w",), grad_norm=math.inf, layer_grad_norm=[math.inf],
                       layer_grad_max_abs=[math.inf], layer_grad_nonfinite=[True], layer_weight_norm=[1.0],
                       learning_rates=[0.1], ranks=[RankStats(0, 1.0, loss_bad, 0, 1, 0.1)])
        st.extra.update(extra)
        state.record(st)
        samples = {s.name: s.value for f in StatsCollector(state).collect() for s in f.samples}
        return samples["gradwatch_rank_nonfinite"]

    assert rank_nonfinite({"amp_overflow": True}, loss_bad=False) == 0
    assert rank_nonfinite({}, loss_bad=False) == 1
    assert rank_nonfinite({"amp_overflow": True}, loss_bad=True) == 1


def test_skip_steps_with_a_grad_scaler_on_unmeasured_steps():
    """A skip on a step that would not be measured must still unscale, or scaler.update() raises;
    the skipped steps leave the parameters as they were."""
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    agent = HealthAgent(model, opt, job="amp-skip", metrics_port=None, stats_every=4, activation_every=0)
    snapshots = []
    for step in range(6):
        if step == 1:
            agent.remediation.skip_left = 3  # what a skip_steps(3) command sets on every rank
        loss = model(torch.randn(8, 12)).pow(2).mean()
        scaler.scale(loss).backward()
        agent.step(opt, loss=loss, scaler=scaler)
        scaler.update()  # raised "No inf checks were recorded" before the fix
        opt.zero_grad()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    same = [all(torch.equal(a, b) for a, b in zip(snapshots[i - 1], snapshots[i])) for i in range(1, 6)]
    assert same == [True, True, True, False, False]  # steps 1-3 skipped, 4-5 stepped
    assert agent.state.skipped_steps_total["command"] == 3
    agent.close()


def mse_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """The closure `optimizer.step(closure)` takes: zero, forward, backward, return the loss."""

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def test_wrapped_optimizer_step_runs_the_closure_measures_and_guards():
    """`agent.wrap(opt)`: loops the user does not write (Lightning, HF, auto-attach) call
    `optimizer.step(closure)`; the step is measured with the closure's loss, and guarded."""
    from gradwatch.agent import attached_agent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = HealthAgent(model, opt, metrics_port=None, mode="guard", activation_every=0)
    assert agent.wrap() is opt and agent.wrap(opt) is opt  # idempotent
    assert attached_agent(model) is agent and attached_agent(opt) is agent
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    closure = mse_closure(model, opt, x, y)
    loss = opt.step(closure)
    assert agent.step_count == 1
    assert agent.last_stats.loss_mean == pytest.approx(float(loss.detach()))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()  # no closure: the gradients already there; non-finite, so the guard skips it
    assert agent.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    agent.close()


def test_wrapped_optimizer_under_a_grad_scaler_steps_once():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=0)
    agent.wrap()
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
    agent.step(opt, scaler=scaler)  # scaler.step calls the wrapped step: it must not recurse
    scaler.update()
    assert calls == [1] and agent.step_count == 1
    agent.close()


def test_wrap_coexists_with_lr_schedulers_built_before_or_after(recwarn):
    """torch's LR schedulers wrap `optimizer.step` themselves; wrapping must keep a bound method and
    the scheduler's marker, whichever comes first (else: AttributeError, or a spurious warning)."""
    for scheduler_first in (True, False):
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agent = HealthAgent(model, opt, metrics_port=None, activation_every=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler_first else None
        agent.wrap()
        sched = sched or torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(2):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            sched.step()
        assert agent.step_count == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
        agent.close()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)]


def test_wrapped_step_passes_keyword_arguments_through():
    """`opt.step(**kwargs)` on a wrapped optimizer: the keywords reach the optimizer's own step
    (they were dropped), and the step is still measured."""

    class ScaledSGD(torch.optim.SGD):
        seen: list = []

        def step(self, closure=None, *, lr_scale: float = 1.0):
            self.seen.append(lr_scale)
            for group in self.param_groups:
                group["lr"] *= lr_scale
            try:
                return super().step(closure)
            finally:
                for group in self.param_groups:
                    group["lr"] /= lr_scale

    model = nn.Linear(4, 1)
    opt = ScaledSGD(model.parameters(), lr=0.1)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=0)
    agent.wrap()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    before = model.weight.detach().clone()
    grad = model.weight.grad.detach().clone()
    opt.step(lr_scale=2.0)
    assert ScaledSGD.seen == [2.0] and torch.allclose(model.weight, before - 0.2 * grad)  # lr 0.1 * 2
    assert agent.step_count == 1
    agent.close()


def test_wrap_leaves_an_optimizer_that_needs_a_closure_unwrapped(caplog):
    """LBFGS's step requires a closure (it re-evaluates the loss): wrapping it would break
    `opt.step(closure)`, so wrap returns it as it is and says so once."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    agent = HealthAgent(model, opt, metrics_port=None, activation_every=0)
    original = opt.step
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        assert agent.wrap() is opt and agent.wrap(opt) is opt
    assert opt.step == original and getattr(opt, "_gradwatch_raw_step", None) is None
    assert [r.getMessage() for r in caplog.records].count("gradwatch: LBFGS.step needs a closure; not measured") == 1
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    closure = mse_closure(model, opt, x, y)
    first = float(opt.step(closure).detach())
    assert float(closure()) < first and agent.step_count == 0
    agent.close()


def test_detail_steps_ride_on_measured_steps_and_add_none():
    """detail_every picks which measured steps also carry max-abs and weight norms; with stats_every=4 it
    must not add a measured step (a collective and a sync) at step 10: details at steps 0 and 20 only."""
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = HealthAgent(model, opt, metrics_port=None, stats_every=4, detail_every=10, activation_every=0, update_ratio_every=0)
    detailed = {}
    for step in range(24):
        model(torch.randn(8, 12)).sum().backward()
        agent.step(opt)
        opt.zero_grad()
        if agent.last_stats is not None and agent.last_stats.step == step:
            detailed[step] = agent.last_stats.layer_weight_norm is not None
    assert detailed == {0: True, 4: False, 8: False, 12: False, 16: False, 20: True}
    assert agent.counters.host_syncs == 6
    agent.close()


class _RelativeStepSGD(torch.optim.Optimizer):
    """A group with `lr=None`, as transformers' Adafactor(relative_step=True) has: it sets its own step size."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.01)


def test_learning_rates_that_are_none_or_tensors_are_read_without_failing():
    torch.manual_seed(0)
    model = mixed_mlp()
    params = list(model.parameters())
    opt = _RelativeStepSGD(params)
    agent = HealthAgent(model, opt, metrics_port=None)
    train(agent, model, opt, 2)
    assert agent.step_count == 2 and agent.failopen.on("stats") and not any(agent.state.errors_total.values())
    assert len(agent.last_stats.learning_rates) == 1 and math.isnan(agent.last_stats.learning_rates[0])
    agent.close()
    # a tensor learning rate changed in place after the step: the step's own value is published
    tensor_lr = torch.tensor(0.01)
    opt = torch.optim.SGD(params, lr=tensor_lr)
    agent = HealthAgent(model, opt, metrics_port=None)
    loss = model(torch.randn(8, 12)).pow(2).mean()
    loss.backward()
    agent.step(opt, loss=loss)
    assert agent.last_stats.learning_rates == [pytest.approx(0.01)]
    assert isinstance(agent.last_stats.learning_rates[0], float)
    agent.close()


def test_an_activation_index_without_names_is_no_nan_origin():
    """Activation statistics switched off between a step's measuring and its publishing (a combination
    read after a hook failed): the step's module index has no name any more; the origin falls back to
    the loss or the gradients instead of failing the statistics."""
    from gradwatch.agent.stats import RankStats, StepStats, find_nan_origin

    ranks = [RankStats(rank=r, loss=math.nan if r == 1 else 1.0, loss_nonfinite=r == 1, nonfinite_layers=0,
                       nonfinite_modules=1, step_seconds=0.1) for r in range(2)]
    stats = StepStats(step=5, time=0.0, world_size=2, layers=["a", "b"], grad_norm=math.nan, layer_grad_norm=[1.0, math.nan],
                      layer_grad_nonfinite=[False, True], learning_rates=[0.1], ranks=ranks, loss_mean=math.nan, loss_max=math.nan)
    origin = find_nan_origin(stats, [2, 0], (), lambda layer: ())
    assert (origin.step, origin.kind, origin.layer, origin.ranks) == (5, "loss", "loss", (1,))
    named = find_nan_origin(stats, [2, 0], ("m0", "m1"), lambda layer: ())
    assert (named.kind, named.layer, named.ranks) == ("activation", "m1", (0,))
