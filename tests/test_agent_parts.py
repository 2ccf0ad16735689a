"""The agent's pure pieces on their own: the schedule, the guard's decision, the step record, the
remediation state, the step router and the adapters' loss window."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.agent.exporter import AgentState
from gradwatch.agent.guard import Decision, Guard, decide
from gradwatch.agent.integrations.adapters import MAX_MICRO_BATCHES, LossWindow, OnceLogger
from gradwatch.agent.remediation import Remediation
from gradwatch.agent.schedule import MAX_COMBINED, Schedule
from gradwatch.agent.stats import RANK_FIELDS, RANK_INDEX, build_step_stats
from gradwatch.agent.step_router import RAW_STEP, is_routed, needs_closure, raw_step
from gradwatch.wire.commands import Command, ScaleLr, SetClipNorm, SkipSteps, encode


def schedule(**kw) -> Schedule:
    base = dict(stats_every=4, activation_every=10, update_ratio_every=6, detail_every=8, combine_seconds=2.0, world_size=2)
    return Schedule(**{**base, **kw})


def test_measured_steps_follow_the_step_counter_alone():
    s = schedule()
    measured = [n for n in range(25) if s.measured(n, every_step=False, activations=True)]
    # multiples of 4, of 10 (activations), and the step after each update snapshot (0, 6, 12, 18, 24)
    assert measured == [0, 1, 4, 7, 8, 10, 12, 13, 16, 19, 20, 24]
    assert [n for n in range(25) if s.measured(n, every_step=False, activations=False)] == [0, 1, 4, 7, 8, 12, 13, 16, 19, 20, 24]
    assert all(s.measured(n, every_step=True, activations=False) for n in range(25))
    assert [n for n in range(20) if s.detail_due(n)] == [0, 8, 16]
    assert not schedule(update_ratio_every=0).update_due(1) and not schedule(activation_every=0).activation_due(0)


def host_with_pace(seconds: list[float]) -> dict[str, list[float]]:
    row = [0.0] * len(RANK_FIELDS)
    slab: list[float] = []
    for value in seconds:
        row[RANK_INDEX["step_seconds"]] = value
        slab += row
    return {"ranks": slab}


def test_steps_to_combine_fit_the_slowest_rank_and_grow_at_most_twofold():
    s = schedule(stats_every=1, combine_seconds=2.0)
    assert s.steps_to_combine([host_with_pace([0.1, 0.5])]) == 2  # 4 fit at the slow rank's pace, 2x one read
    assert s.steps_to_combine([host_with_pace([0.1, 0.5])] * 3) == 4
    assert s.steps_to_combine([host_with_pace([0.001, 0.001])] * 16) == MAX_COMBINED
    assert s.steps_to_combine([host_with_pace([0.0, 0.0])]) == 1  # no pace known yet
    assert schedule(world_size=1).steps_to_combine([host_with_pace([0.1])]) == 1
    assert schedule(combine_seconds=0).steps_to_combine([host_with_pace([0.1, 0.1])]) == 1


def record(grad_sumsq: list[float], **extra: list[float]):
    slab = [0.0] * (2 * len(RANK_FIELDS))
    slab[RANK_INDEX["has_loss"]], slab[RANK_INDEX["loss"]] = 1.0, 2.0
    slab[len(RANK_FIELDS) + RANK_INDEX["has_loss"]], slab[len(RANK_FIELDS) + RANK_INDEX["loss"]] = 1.0, 4.0
    host = {"ranks": slab, "grad_sumsq": grad_sumsq, **extra}
    return build_step_stats(7, 123.0, host, ("a", "b"), 2, [0.1], lambda bad: [sum(bad), 0])


def test_the_step_record_is_built_from_reduced_values():
    stats = record([9.0, 16.0], grad_max_abs=[1.0, 2.0], weight_sumsq=[4.0, 0.0],
                   update_sumsq=[1.0, 1.0], update_base_sumsq=[4.0, 0.0])
    assert stats.grad_norm == 5.0 and stats.layer_grad_norm == [3.0, 4.0] and not stats.nonfinite
    assert (stats.loss_mean, stats.loss_max) == (3.0, 4.0)
    assert stats.layer_weight_norm == [2.0, 0.0] and stats.update_step == 6
    assert stats.layer_update_ratio[0] == 0.5 and math.isnan(stats.layer_update_ratio[1])  # all-zero weight: undefined
    bad = record([math.inf, 1.0])
    assert bad.nonfinite and bad.layer_grad_nonfinite == [True, False] and bad.ranks[0].nonfinite_layers == 1
    assert bad.layer_grad_max_abs is None and bad.activations is None


def test_decide_skips_nonfinite_clips_to_a_command_and_leaves_amp_overflow_to_the_scaler():
    stats = record([9.0, 16.0])
    assert decide(None, None, 1.0) == Decision()  # not measured: nothing decided
    assert decide(None, stats, None) == Decision()
    assert decide(None, stats, 2.0) == Decision(clip_to=2.0, reason="command")
    assert decide(None, stats, 10.0) == Decision()
    assert decide(Guard(warmup_steps=1), record([math.nan, 1.0]), None).skip
    stats.extra["amp_overflow"] = True
    assert decide(Guard(warmup_steps=1), stats, 2.0) == Decision()


def command(cid: str, spec) -> Command:
    return Command(id=cid, job="j", spec=spec, source="operator", created_at=0.0, expires_at=60.0)


def wire(cmd_spec, seq: int) -> list[float]:
    code, value = encode(cmd_spec)
    return [float(seq), code, value]


def test_remediation_applies_commands_in_order_and_acks_on_rank_zero():
    acks: list[tuple] = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    rank0, rank1 = Remediation(0, AgentState("j", 2, "ddp", "t")), Remediation(1, AgentState("j", 2, "ddp", "t"))
    rank0.ack = lambda *a: acks.append(a)
    slot = torch.zeros(3)
    sent = [command(f"c{i}", spec) for i, spec in
            enumerate((SetClipNorm(max_norm=1.5), ScaleLr(factor=0.5), SkipSteps(n=2)))]
    rows = []
    for cmd in sent:
        rank0.send(cmd, slot)
        rows.append(slot.tolist())
    assert rows == [wire(c.spec, i + 1) for i, c in enumerate(sent)]
    for remediation in (rank0, rank1):
        for row in rows + [[0.0, 0.0, 0.0]]:  # a packet with no command on it adds nothing
            remediation.arrive(row)
        assert remediation.pending and remediation.apply_arrived(3, opt) is None and not remediation.pending
        assert (remediation.clip_norm, remediation.lr_factor, remediation.skip_left) == (1.5, 0.5, 2)
        assert [(c.kind, c.outcome) for c in remediation.applied] == [("set_clip_norm", "applied"), ("scale_lr", "applied"), ("skip_steps", "applied")]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # both ranks scaled this one optimizer
    assert [a[:3] for a in acks] == [("c0", 3, "applied"), ("c1", 3, "applied"), ("c2", 3, "applied")]
    assert rank1.take_skip() and rank1.take_skip() and not rank1.take_skip()
    rank0.send(command("late", SetClipNorm(max_norm=2.0)), slot)
    rank0.close(9)
    assert acks[-1][:3] == ("late", 9, "rejected")


def test_the_router_marks_a_routed_optimizer_with_its_raw_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert not is_routed(opt) and raw_step(opt) == opt.step and not needs_closure(opt)
    assert needs_closure(torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(1))]))
    setattr(opt, RAW_STEP, lambda: "raw")
    assert is_routed(opt) and raw_step(opt)() == "raw"


def test_the_loss_window_averages_sums_unscales_and_stays_bounded():
    failures: list[str] = []

    class Recorder(OnceLogger):
        def __call__(self, what: str, exc: BaseException) -> None:
            failures.append(what)

    window = LossWindow(Recorder("test"))
    assert window.take() is None
    for value in (1.0, 2.0, 3.0):
        window.add(torch.tensor(value), factor=2.0)
    window.add(torch.tensor([4.0, 8.0]))  # a per-sample loss: its mean
    assert window.take().tolist() == [2.0, 4.0, 6.0, 6.0] and len(window) == 0
    window.add(torch.tensor(3.0))
    window.add(torch.tensor(5.0))
    assert window.take(summed=True, divisor=lambda: 4.0).item() == 2.0
    for _ in range(MAX_MICRO_BATCHES + 5):
        window.add(torch.tensor(1.0))
    assert len(window) == MAX_MICRO_BATCHES
    window.add("not a tensor")  # type: ignore[arg-type]  # logged, never raised
    window.clear()
    window.add(torch.tensor(1.0))
    assert window.take(divisor=lambda: 1 / 0) is None and failures == ["reading the loss", "reading the loss"]
