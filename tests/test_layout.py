"""The job-wide layout (layout.py) as a pure function: who holds which piece, who measures it, what is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.agent.grad_stats import GradStats
from gradwatch.agent.layout import LayoutError, ParamInfo, agree, plan_layout
from gradwatch.agent.packet import Combined, Counters, Packet


def plain(name: str, size: int) -> ParamInfo:
    return ParamInfo(name, (size,), "", -1, (), False, size)


def on_mesh(name: str, size: int, placements: str, shard_dims: tuple[int, ...], pieces: int) -> ParamInfo:
    return ParamInfo(name, (size,), placements, 0, shard_dims, False, size // pieces)


def plan(ranks, every_copy=False):
    return [plan_layout(r, ranks, every_copy=every_copy, depth=None, max_layers=256) for r in range(len(ranks))]


def test_replicas_are_measured_once_balanced_by_size():
    sizes = [1000, 10, 400, 600, 5, 990]
    infos = [plain(f"l{i}", s) for i, s in enumerate(sizes)]
    layouts = plan([(infos, [])] * 2)
    assert sorted(i for lay in layouts for i in lay.measured) == list(range(6)), "every tensor measured by exactly one rank"
    load = [sum(sizes[i] for i in lay.measured) for lay in layouts]
    best = min(max(sum(s for i, s in enumerate(sizes) if m >> i & 1), sum(s for i, s in enumerate(sizes) if not m >> i & 1))
               for m in range(2 ** len(sizes)))
    assert max(load) <= 7 / 6 * best  # largest-first's bound for two ranks (Graham: 4/3 - 1/(3m))
    assert all(lay.max_by_sum for lay in layouts)  # each layer whole on one rank: max-abs needs no MAX
    assert all(lay.weights is None for lay in layouts)
    assert [lay.layers for lay in layouts] == [tuple(f"l{i}" for i in range(6))] * 2


def test_hsdp_pieces_are_measured_once_per_shard_and_guard_weighs_every_copy():
    # mesh (replicate=2, shard=2): rank = 2*rep + shard; placements (Replicate, Shard(0))
    infos = [on_mesh("w", 8, "R,S(0)", (1,), 2), on_mesh("b", 4, "R,S(0)", (1,), 2)]
    ranks = [(infos, [(r // 2, r % 2)]) for r in range(4)]
    layouts = plan(ranks)
    for shard in (0, 1):  # ranks shard and 2 + shard hold the same piece: exactly one measures each tensor
        holders = (shard, 2 + shard)
        for i in range(2):
            assert sum(i in layouts[r].measured for r in holders) == 1
    assert not layouts[0].max_by_sum  # a layer's shards on different ranks: max-abs needs MAX
    guarded = plan(ranks, every_copy=True)
    assert all(g.measured == (0, 1) and g.weights == (0.5, 0.5) for g in guarded)


def test_a_replicated_bias_under_tensor_parallel_is_one_piece():
    tp = [on_mesh("fc.weight", 8, "S(1)", (0,), 2), ParamInfo("fc.bias", (4,), "R", 0, (), False, 4)]
    layouts = plan([(tp, [(r,)]) for r in range(2)])
    assert all(0 in lay.measured for lay in layouts)  # each rank's own weight shard
    assert sum(1 in lay.measured for lay in layouts) == 1  # the replicated bias once
    assert [lay.layers for lay in layouts] == [("fc.weight", "fc.bias")] * 2


def test_pipeline_stages_share_one_plan_and_name_their_ranks():
    stage0 = [plain("layers.0.weight", 4), plain("layers.1.weight", 4)]
    stage1 = [plain("layers.2.weight", 4), plain("head.weight", 2)]
    layouts = plan([(stage0, []), (stage0, []), (stage1, []), (stage1, [])])  # 2 stages x 2 DDP replicas
    assert {lay.layers for lay in layouts} == {("layers.0.weight", "layers.1.weight", "layers.2.weight", "head.weight")}
    assert layouts[2].layer_of_param == (2, 3)
    assert layouts[0].ranks_holding(0) == (0, 1) and layouts[0].ranks_holding(3) == (2, 3)
    assert layouts[0].nonfinite_per_rank([False, False, True, False]) == [0, 0, 1, 1]
    for replicas in ((0, 1), (2, 3)):  # each stage's tensors measured once, by one of its replicas
        for i in (0, 1):
            assert sum(i in layouts[r].measured for r in replicas) == 1


def test_the_same_name_for_different_tensors_is_refused():
    with pytest.raises(LayoutError, match=r"'0.weight' is \(4,\).*rank 0.*\(8,\).*rank 1.*pipelining"):
        plan([([plain("0.weight", 4)], []), ([plain("0.weight", 8)], [])])


def test_a_partial_placement_is_refused_at_construction():
    pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.tensor import Partial

    from gradwatch.agent.layout import _shard_dims

    with pytest.raises(LayoutError, match="'fc.weight' has a Partial\\(\\) placement on mesh dimension 1"):
        _shard_dims("fc.weight", [torch.distributed.tensor.Replicate(), Partial()])


def test_a_rank_that_measures_nothing_writes_zeros_and_the_shares_add_up():
    """DDP with more ranks than layers: the idle ranks' shares are zeros; the SUM adds the others'."""
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    (layout, named), = [agree(model, 0, 1, rank_local_plain=False, every_copy=False, depth=None, max_layers=64)]
    infos = [plain(n, p.numel()) for n, p in named]
    layouts = plan([(infos, [])] * 4)
    totals = [0.0] * layout.num_layers
    for lay in layouts:
        stats = GradStats([p for _, p in named], lay, torch.device("cpu"))
        packet = Packet(stats.spec(with_detail=True, with_update=False), torch.device("cpu"))
        stats.add_gradients(packet)
        stats.add_weights(packet)
        host = Combined([packet], None, 1, Counters()).to_host(Counters())[0]
        if not lay.measured:
            assert host == {k: [0.0] * len(v) for k, v in host.items()}
        totals = [a + b for a, b in zip(totals, host["grad_sumsq"])]
    assert sum(1 for lay in layouts if not lay.measured) == 4 - layout.num_layers
    assert totals == pytest.approx([float(p.grad.pow(2).sum()) for p in model.parameters()])
