"""The agent on real multi-process gloo jobs (DDP and FSDP2, 2 and 4 ranks)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.multiproc

REL = 1e-5


def assert_close(agent: list[float], ref: list[float], what: str) -> None:
    assert len(agent) == len(ref), what
    for i, (a, r) in enumerate(zip(agent, ref)):
        assert a == pytest.approx(r, rel=REL, abs=1e-9, nan_ok=True), f"{what}[{i}]: agent {a} vs reference {r}"


def assert_steps_match_reference(steps: list[dict], where: str) -> None:
    """Every reported step's per-layer gradient norm, max-abs, weight norm and global norm equal the reference's."""
    for step in steps:
        at = f"{where}step {step['step']}"
        assert_close(step["agent_grad"], step["ref_grad"], f"{at} layer grad norm")
        assert_close(step["agent_max"], step["ref_max"], f"{at} layer grad max-abs")
        assert_close(step["agent_weight"], step["ref_weight"], f"{at} weight norm")
        assert step["agent_global"] == pytest.approx(step["ref_global"], rel=REL), f"{at} global norm"


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_norms_equal_single_process_reference(run_ranks, wrap, world_size):
    """Steps combined (at most 2 here): {0} (read at once: no pace known yet), {1, 2}, {3, 4}; step 5, still pending
    when training ends, is read by close(). Every step published, in order, exact."""
    results = run_ranks("reference", world_size, wrap=wrap, steps=6, combine=2)
    r0 = results[0]
    assert r0["sharding"] == wrap
    assert [s["step"] for s in r0["steps"]] == [0, 1, 2, 3, 4, 5]
    assert_steps_match_reference(r0["steps"], "")
    # update ratios of steps 0 and 2 are measured at steps 1 and 3 (update_ratio_every=2)
    by_step = {s["step"]: s for s in r0["steps"]}
    for measured in (1, 3):
        s = by_step[measured]
        assert s["update_step"] == measured - 1
        assert_close(s["agent_update"], by_step[measured - 1]["ref_update"], f"update ratio of step {measured - 1}")
    # every rank computed the same statistics (they decide from them)
    for other in results[1:]:
        assert [s["agent_grad"] for s in other["steps"]] == [s["agent_grad"] for s in r0["steps"]]
    # the documented budget, per combination: one SUM, one MAX if any of its steps has MAX entries
    # (DDP: activation steps 0, 2, 4; FSDP: every step, detail_every=1), one sync; close() adds one small
    # all-reduce that checks every rank holds the same steps
    assert r0["collectives"] == 3 * 2 + 1 + (1 if wrap == "ddp" else 2)
    assert r0["syncs"] == 4
    before, built, closed = r0["groups"]
    assert built == before + 1 and closed == before  # the close-time group is the agent's, and close() frees it


@pytest.mark.parametrize("layout, mode", [("hsdp", "observe"), ("tp", "observe"), ("fsdp2_tp", "observe"),
                                          ("hsdp", "guard"), ("fsdp2_tp", "guard")])
def test_multi_dimensional_layouts_equal_the_single_process_reference(run_ranks, layout, mode):
    """4 ranks: HSDP (replicate 2 x shard 2), tensor parallel on 2 with 2 identical copies, FSDP2 on 2 x TP on 2.
    Each piece of each tensor counted once (mode observe: measured by one holder; guard: every copy, weighed).
    Without it HSDP and the replicated row-parallel bias read sqrt(2) too large."""
    results = run_ranks("reference", 4, wrap=layout, mode=mode, steps=4, **({"combine": 2} if mode == "observe" else {}))
    r0 = results[0]
    assert r0["sharding"] == ("dtensor" if layout == "tp" else "fsdp2")
    assert [s["step"] for s in r0["steps"]] == [0, 1, 2, 3]
    assert_steps_match_reference(r0["steps"], f"{layout} ")
    by_step = {s["step"]: s for s in r0["steps"]}
    assert_close(by_step[1]["agent_update"], by_step[0]["ref_update"], f"{layout} update ratio of step 0")
    for other in results[1:]:
        assert [s["agent_grad"] for s in other["steps"]] == [s["agent_grad"] for s in r0["steps"]]
    # one SUM and, with detail_every=1 and the pieces of a layer on several ranks, one MAX per read; one sync each
    reads = 3 if mode == "observe" else 4  # observe: {0}, {1, 2}, then 3 at close()
    assert r0["syncs"] == reads
    assert r0["collectives"] == 2 * reads + (1 if mode == "observe" else 0)  # close() checks the pending steps match


@pytest.mark.parametrize("mode", ["observe", "guard"])
def test_pipeline_stages_report_one_job_wide_plan(run_ranks, mode):
    """2 stages x 2 copies on 4 ranks: each stage's layers named once in one plan every rank holds, norms over
    all stages equal to the single-process model's, the loss from the last stage only, and a NaN in a last-stage
    gradient named by that stage's ranks. Same collectives on every rank (a mismatch would hang or raise)."""
    results = run_ranks("pipeline", 4, mode=mode, steps=4, nan_step=3)
    r0 = results[0]
    assert r0["layers"] == r0["ref_layers"]  # stage 0's parameters, then stage 1's: the whole model, once
    assert_steps_match_reference(r0["steps"][:3], "pp ")
    for step in r0["steps"][:3]:
        assert step["loss_mean"] == pytest.approx(step["ref_loss"], rel=REL)  # the two last-stage halves
    for r in results:
        assert r["layers"] == r0["layers"] and [s["agent_grad"] for s in r["steps"]] == [s["agent_grad"] for s in r0["steps"]]
        assert r["origin"] == {"step": 3, "kind": "gradient", "layer": "5.weight", "ranks": [2, 3]}
        assert r["collectives"] == r0["collectives"] and r["syncs"] == r0["syncs"]
    stage_layers = [set(r["measured"]) for r in results]
    if mode == "observe":  # every layer measured by exactly one rank of its stage
        assert sum(len(m) for m in stage_layers) == len(r0["layers"])
        assert set().union(*stage_layers[:2]) == {n for n in r0["layers"] if int(n.split(".")[0]) < 4}
    else:  # every copy measures its stage's layers
        assert stage_layers[0] == stage_layers[1] and stage_layers[2] == stage_layers[3]
        assert stage_layers[0] | stage_layers[2] == set(r0["layers"]) and not stage_layers[0] & stage_layers[2]


@pytest.mark.parametrize("grouped", [True, False], ids=["dtensor-experts", "named-experts"])
def test_expert_parallel_reports_each_expert_once(run_ranks, grouped):
    """8 experts over 4 ranks: one sharded expert tensor (its norm over every rank's experts) or one module per
    expert, each present on its own rank only and reported once; the global norm is the single-process one."""
    results = run_ranks("experts", 4, grouped=grouped)
    r0 = results[0]
    experts = [f"experts.{e}.weight" for e in range(8)]
    if grouped:
        assert [n for n in r0["layers"] if n.startswith(("w", "experts"))] == ["w"]
    else:
        assert sorted(n for n in r0["layers"] if n.startswith("experts")) == sorted(experts)
    for step in r0["steps"]:
        ref = dict(step["ref_by_name"])
        if grouped:
            ref["w"] = math.sqrt(sum(ref.pop(name) ** 2 for name in experts))
        assert set(step["agent"]) == set(ref)
        for name, value in step["agent"].items():
            assert value == pytest.approx(ref[name], rel=REL), f"step {step['step']} {name}"
        assert step["agent_global"] == pytest.approx(step["ref_global"], rel=REL)
    for r in results[1:]:
        assert r["steps"] == r0["steps"]


def test_a_lone_close_neither_hangs_nor_pairs_with_a_training_collective(run_ranks):
    r0, r1 = run_ranks("lone_close", 2, timeout_s=3)
    assert r0["user_sum"] == r1["user_sum"] == 3.0  # the user's all-reduce met its own kind
    assert r0["published"] == r1["published"] == 3  # steps 0-2 read in training; the pending 3 dropped, not half-read
    assert 3 <= r1["closed_s"] < 10 and r0["closed_s"] < 10


def test_fsdp_issues_the_max_all_reduce_only_on_detail_and_activation_steps(run_ranks):
    """Max-abs and weight norms are sampled (detail_every): FSDP then needs its MAX all-reduce only on
    detail steps (0, 3) and activation steps (0, 2); the SUM runs every step. Same count on every rank."""
    results = run_ranks("reference", 2, wrap="fsdp2", steps=4, detail_every=3)
    for r in results:
        assert r["collectives"] == 4 + len({0, 3} | {0, 2})
        assert [s["agent_max"] is not None for s in r["steps"]] == [True, False, False, True]
        assert [s["agent_weight"] is not None for s in r["steps"]] == [True, False, False, True]
    for s in results[0]["steps"]:
        if s["agent_max"] is not None:
            assert_close(s["agent_max"], s["ref_max"], f"step {s['step']} layer grad max-abs")
            assert_close(s["agent_weight"], s["ref_weight"], f"step {s['step']} weight norm")


def test_ddp_split_reads_a_replicated_fault_on_every_rank(run_ranks):
    """DDP, mode observe: each rank measures its share of the layers. An inf in a layer rank 0
    measures (param 4, layer "3.weight"), then in one rank 1 measures (param 0, "0.weight"), must be a
    non-finite layer on both ranks and count in both ranks' rows (not a lone rank: no outlier alert)."""
    results = run_ranks("replicated_fault", 2, faulty_params=[4, 0])
    r0, r1 = results
    assert r0["split"] and r1["split"]
    assert 4 in r0["measured"] and 0 in r1["measured"]
    assert sorted(r0["measured"] + r1["measured"]) == list(range(10)), "every parameter measured by exactly one rank"
    assert [s["bad_layers"] for s in r0["steps"]] == [[], ["3.weight"], ["0.weight"]]
    assert [s["rows"] for s in r0["steps"]] == [[0, 0], [1, 1], [1, 1]]
    assert r1["steps"] == r0["steps"]


def test_gradient_accumulation_reports_per_optimizer_step(run_ranks):
    results = run_ranks("reference", 2, wrap="ddp", steps=3, accumulate=3)
    steps = results[0]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert_close(s["agent_grad"], s["ref_grad"], f"accumulated step {s['step']}")


def test_exploding_regression_reports_step_and_layer(run_ranks):
    r0, r1 = run_ranks("unscaled_regression", 2)
    assert r0["first_bad_step"] is not None, "the unscaled regression did not diverge: the scenario no longer reproduces"
    origin = r0["origin"]
    assert origin is not None
    assert origin["step"] == r0["first_bad_step"]
    assert origin["layer"] in r0["layers"] + ["loss", "fc1", "act", "fc2"]
    assert origin["kind"] in ("activation", "loss", "gradient")
    assert r1["origin"] == origin  # every rank knows the same origin


@pytest.mark.parametrize("activation_every, combine", [(10, 4), (1, None)])
def test_nan_injected_on_one_rank_is_attributed(run_ranks, activation_every, combine):
    # step 5 is not a sampled activation step when activation_every=10: the every-step sentinel catches
    # it; combined up to 4 at a time ({0}, {1, 2}, {3-6}, then 7 at close) it is read with steps 3-6
    # and still attributed to step 5
    extra = {} if combine is None else dict(combine=combine)
    results = run_ranks("nan_inject", 2, rank=1, module=4, step=5, activation_every=activation_every, **extra)
    assert results[0]["origin"] == {"step": 5, "kind": "activation", "layer": "4", "ranks": [1]}


def test_nan_attribution_under_fsdp2(run_ranks):
    results = run_ranks("nan_inject", 2, rank=0, module=2, step=2, wrap="fsdp2")
    assert results[1]["origin"] == {"step": 2, "kind": "activation", "layer": "2", "ranks": [0]}


def test_prometheus_endpoint_serves_documented_series(run_ranks):
    r0 = run_ranks("prometheus", 2)[0]
    early, late = r0["scrapes"]
    samples = {}
    for family in text_string_to_metric_families(late):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    L, A, R, G = r0["layers"], r0["activation_modules"], 2, r0["param_groups"]
    # the documented formula (docs/metrics.md): 5L + 6A + 7R + G + 25, no NaN seen
    assert sum(len(v) for v in samples.values()) == 5 * L + 6 * A + 7 * R + G + 25
    assert samples["gradwatch_training_finished"][0].value == 0
    assert {s.labels["rank"]: s.value for s in samples["gradwatch_rank_last_step"]} == {"0": 5, "1": 5}
    assert all(s.value == 0 for s in samples["gradwatch_rank_phase"])  # between steps
    assert all(s.value > 0 for s in samples["gradwatch_rank_heartbeat_timestamp_seconds"])
    assert samples["gradwatch_skipped_steps_total"][0].value == 0
    for name in ("gradwatch_layer_grad_norm", "gradwatch_layer_weight_norm", "gradwatch_layer_update_ratio"):
        assert len(samples[name]) == L
        assert all(s.labels["job"] == "prom-test" for s in samples[name])
        assert all(math.isfinite(s.value) and s.value >= 0 for s in samples[name] if not (name.endswith("ratio") and math.isnan(s.value)))
        assert any(s.value > 0 for s in samples[name])
    assert {s.labels["rank"] for s in samples["gradwatch_rank_loss"]} == {"0", "1"}
    assert samples["gradwatch_steps_total"][0].value == 6
    assert samples["gradwatch_step"][0].value == 5
    assert samples["gradwatch_loss"][0].value == pytest.approx(r0["loss_mean"])
    assert samples["gradwatch_eval_loss"][0].value == 1.5
    assert sorted(s.value for s in samples["gradwatch_learning_rate"]) == [0.01, 0.05]
    assert samples["gradwatch_nonfinite_steps_total"][0].value == 0
    assert samples["gradwatch_agent_host_syncs_total"][0].value == 6
    assert all(0 <= s.value <= 1 for s in samples["gradwatch_activation_dead_ratio"])
    assert "gradwatch_eval_loss" not in early  # scraped before observe_eval: values are live, not canned


@pytest.mark.parametrize("feature", ["stats", "activations", "export"])
def test_failure_inside_agent_on_one_rank_fails_open_on_all(run_ranks, feature):
    results = run_ranks("failopen", 2, feature=feature)
    for r in results:
        assert r["steps"] == 8, "training must go on after the agent fails"
        assert r["params_identical"] is True
        if feature == "stats":
            assert r["stats_enabled"] is False
            assert r["last_step"] == 2  # step 3 failed; both ranks stopped measuring at the same step
        elif feature == "activations":
            assert r["stats_enabled"] is True and r["activations_on"] is False
            assert r["last_step"] == 7  # gradient statistics go on without activations
        else:  # rank 0's exporter broke: only the export stops; both ranks keep measuring (no hang)
            assert r["stats_enabled"] is True and r["activations_on"] is True and r["last_step"] == 7
    failing_rank = 0 if feature == "export" else 1
    assert results[failing_rank]["errors"][feature] >= 1


def test_an_activation_failure_and_a_nan_in_one_combination_keep_statistics_on(run_ranks):
    for r in run_ranks("acts_fail_then_nan", 2):
        assert r["stats_enabled"] is True and r["activations_on"] is False and r["last_step"] == 10
        # no loss was passed and activations are off: the NaN is found in the gradients, at its step
        assert r["origin"] is not None and r["origin"]["step"] == 8 and r["origin"]["kind"] == "gradient"
        assert r["errors"].get("stats", 0) == 0


def test_frozen_and_unused_parameters(run_ranks):
    r0 = run_ranks("frozen_unused", 2)[0]
    assert r0["layers"] == ["body.weight", "body.bias", "unused.weight", "unused.bias"]
    grads = dict(zip(r0["layers"], r0["grad"]))
    assert grads["unused.weight"] == 0.0 and grads["unused.bias"] == 0.0
    assert grads["body.weight"] > 0
    assert r0["nonfinite"] is False and math.isfinite(r0["grad_norm"])


def test_dead_units_and_saturation_over_the_global_batch(run_ranks):
    r0 = run_ranks("activations", 2)[0]
    by_module = dict(zip(r0["modules"], range(len(r0["modules"]))))
    relu = by_module["1"]
    # units 1-3 are zero on both ranks; unit 0 lives on rank 1, units 4-7 on rank 0
    assert r0["dead"][relu] == pytest.approx(3 / 8)
    tanh = by_module["3"]
    # tanh inputs are 30*relu(x): rank 0 has 4 saturating units of 8 (x >= 0.5 -> 15 > 9.4999), rank 1 one
    assert r0["saturated"][tanh] == pytest.approx((4 + 1) / 16)


@pytest.mark.parametrize("order, backend", [("compile_ddp", "inductor"), ("ddp_compiled", "aot_eager")])
def test_a_compiled_ddp_model_with_activations_compiles_once_over_the_global_batch(run_ranks, order, backend):
    """`torch.compile(DDP(model))` (inductor) and `DDP(torch.compile(model))` (aot_eager: the same Dynamo
    tracing, without a second cold inductor compile), activation statistics every 10 steps over 21 steps: one
    graph and no recompile on either rank (`error_on_recompile` would raise), and each sampled step's statistics
    those of the whole global batch in one process. Frames: DDP's own forward graph-breaks (it is not traced)
    and is counted as frames every step, with or without the agent; the model's own forward is one frame."""
    results = run_ranks("compiled", 2, order=order, backend=backend, steps=21)
    for r in results:
        assert r["graphs"] == 1 and r["recompiles"] == 0 and r["traced"]
        assert r["errors"]["activations"] == 0 and r["errors"]["stats"] == 0
        if order == "ddp_compiled":
            assert r["frames"] == {"total": 1, "ok": 1}
    r0 = results[0]
    assert [s["step"] for s in r0["steps"]] == [0, 10, 20]
    for s in r0["steps"]:
        assert (s["dead_ratio"] is None) == (s["step"] == 0)  # the unit layout is agreed at the first sampled step
        for field in ("mean", "std", "max_abs", "saturated_ratio") + (("dead_ratio",) if s["step"] else ()):
            assert_close(s[field], [s["ref"][m][field] for m in r0["modules"]], f"step {s['step']} {field}")
        assert s["nonfinite"] == [0] * len(r0["modules"])
        relu, tanh = r0["modules"].index("net.2"), r0["modules"].index("net.4")
        assert s["saturated_ratio"][tanh] > 0 and (s["step"] == 0 or s["dead_ratio"][relu] >= 4 / 32)
    assert results[1]["steps"] == r0["steps"]
