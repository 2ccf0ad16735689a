"""Mode `guard` (the fast loop), on real 2-rank gloo jobs: a non-finite step is skipped on every
rank with parameters and optimizer state bitwise unchanged; a gradient-norm spike is clipped on
every rank at the same step; ranks stay bitwise identical."""

from __future__ import annotations

import math

import pytest

from gradwatch.agent.guard import Guard


@pytest.mark.multiproc
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_guard_skips_and_clips_the_same_step_on_every_rank(run_ranks, wrap):
    r = run_ranks("guard", 2, wrap=wrap, steps=16, spike_step=9, nan_step=12, grad_fault_step=14)
    for rank in r:
        assert rank["skipped"] == [12, 14]  # only the poisoned steps, on both ranks
        assert rank["clipped"] == [9]  # the 1000x loss spike on rank 0 only: clipped everywhere
        assert rank["params"] == rank["params_after"]  # the skipped step changed no parameter...
        assert rank["opt"] == rank["opt_after"]  # ...and no Adam moment or step count
        assert rank["finite"] and rank["bound"] > 0
    assert r[0]["final"] == r[1]["final"]  # bitwise identical across ranks afterwards


def test_guard_decisions_follow_the_zclip_rule():
    g = Guard(alpha=0.9, z_threshold=2.5, warmup_steps=4)
    for norm in (1.0, 1.2, 0.8, 1.0):
        assert g.decide(norm, nonfinite=False).clip_to is None  # warm-up: baseline only
    mean, std = 1.0, math.sqrt(0.02)
    assert g.mean == pytest.approx(mean) and math.sqrt(g.var) == pytest.approx(std)
    spike = g.decide(10.0, nonfinite=False)
    z = (10.0 - mean) / std
    assert spike.clip_to == pytest.approx(mean + 2.5 ** 2 * std / z)  # the bigger the spike, the tighter
    assert g.mean == pytest.approx(mean + 0.1 * (spike.clip_to - mean))  # updated with the clipped value
    assert g.decide(1.0, nonfinite=False).clip_to is None
    assert g.decide(float("nan"), nonfinite=False).skip and g.decide(1.0, nonfinite=True).skip
    capped = Guard(warmup_steps=100, max_norm=5.0)
    assert capped.decide(7.0, nonfinite=False).clip_to == 5.0
