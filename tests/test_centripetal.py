"""Centripetal cluster-and-merge: clustering edge cases, exact merges of duplicated channels, Plan shapes."""
import dataclasses

import numpy as np
import onnx
import pytest

from onnx_prune.analysis.criteria import Scoring
from onnx_prune.passes.allocate import Allocator, CostModel, Target
from onnx_prune.passes.centripetal import CentripetalSelect, _split_until, channel_features, cluster_rows
from onnx_prune.pipeline import PruneOptions, method_plan, prepare_folded
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.cost import count_cost

from conftest import fixture_path, zoo_model
from invariants import duplicate_model, feeds_for, relative_error, run


def _same_partition(labels, expected) -> bool:
    """Do two labelings cut the rows into the same clusters (whatever the cluster numbers)?"""
    pairs = set(zip(np.asarray(labels).tolist(), np.asarray(expected).tolist()))
    return len(pairs) == len(set(labels)) == len(set(expected))


def test_identical_rows_form_their_own_clusters():
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((4, 6))
    which = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3, 0])
    rows = distinct[which]
    assert _same_partition(cluster_rows(rows, 4), which)
    more = cluster_rows(rows, 6)  # more clusters than distinct rows: duplicates split, never mixed
    assert np.bincount(more).min() >= 1 and len(np.bincount(more)) == 6
    for j in range(6):
        assert len(np.unique(rows[more == j], axis=0)) == 1
    assert len(set(cluster_rows(rows, len(rows)))) == len(rows)


def test_kmeans_clusters_are_deterministic_complete_and_numbered_in_order():
    rng = np.random.default_rng(1)
    rows = np.vstack([rng.standard_normal((30, 5)) + 8 * rng.standard_normal(5) for _ in range(3)])
    labels = cluster_rows(rows, 7, seed=3)
    assert np.array_equal(labels, cluster_rows(rows, 7, seed=3))
    assert np.bincount(labels, minlength=7).min() >= 1 and labels.max() == 6
    _, first = np.unique(labels, return_index=True)
    assert np.all(np.diff(first) > 0)  # cluster j appears before cluster j + 1
    with pytest.raises(ValueError):
        cluster_rows(rows, 0)
    with pytest.raises(ValueError):
        cluster_rows(rows[:3], 4)


def test_empty_clusters_are_refilled_from_the_loosest_cluster():
    rows = np.array([[0.0], [0.1], [10.0], [10.2], [30.0], [50.0]])
    labels = _split_until(rows, np.array([0, 0, 1, 1, 1, 1]), 4)  # as if k-means had left two clusters empty
    assert np.bincount(labels).tolist() == [2, 2, 1, 1]
    assert labels[5] == 2 and labels[4] == 3  # 50 leaves first (farthest from its centroid), then 30


def _duplicate_pairs(prepared, gids):
    """Every other free channel of the groups made a copy of its neighbour: (model, {gid: distinct count})."""
    counts = {}
    for gid in gids:
        group = prepared.analysis.groups[gid]
        free = np.flatnonzero(~group.frozen)
        half = len(free) // 2
        prepared = prepare(duplicate_model(prepared, group, free[0:2 * half:2], free[1:2 * half:2]))
        counts[gid] = group.size - half
    return prepared, counts


def _check_exact_merge(prepared, counts, medoid):
    select = CentripetalSelect(Scoring.of(prepared.model, prepared.weights()), medoid=medoid)
    plan = Plan({gid: select(prepared.analysis.groups[gid], n) for gid, n in counts.items()})
    merged = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    onnx.checker.check_model(merged, full_check=True)
    feeds = feeds_for(prepared.model, batch=1, samples=1)
    assert relative_error(run(prepared.model, feeds), run(merged, feeds)) < 1e-4
    for gid, n in counts.items():
        group = prepared.analysis.groups[gid]
        stats = select.stats[gid]
        assert stats.kept == n and stats.spread == 0.0
        assert sorted(stats.cluster_sizes) == [1] * (2 * n - group.size) + [2] * (group.size - n)
        features = channel_features(group, select.scoring)
        for column in plan.groups[gid].fold.T:  # each cluster holds one filter, twice
            assert len(np.unique(features[column > 0], axis=0)) == 1
    return plan


@pytest.mark.parametrize("medoid", [False, True], ids=["centroid", "medoid"])
@pytest.mark.parametrize("name", ["residual_add", "depthwise", "grouped_conv", "se", "flatten_gemm"])
def test_duplicated_channels_merge_exactly_on_fixtures(name, medoid):
    prepared = prepare_folded(fixture_path(name))
    duplicated, counts = _duplicate_pairs(prepared, [g.id for g in prepared.analysis.prunable_groups])
    _check_exact_merge(duplicated, counts, medoid)


@pytest.mark.zoo
@pytest.mark.parametrize("medoid", [False, True], ids=["centroid", "medoid"])
def test_duplicated_channels_merge_exactly_on_mobilenet_v2(medoid):
    """A residual chain of four tied producers, and the stem whose channels a depthwise conv carries."""
    prepared = prepare_folded(zoo_model("mobilenet_v2", "torchscript"))
    groups = prepared.analysis.prunable_groups
    tied = max(groups, key=lambda g: (len(g.nodes("producer")), -g.size))
    carried = next(g for g in groups if g.by_role("carrier"))
    assert len(tied.nodes("producer")) == 4 and carried.by_role("carrier")[0].node != carried.name
    duplicated, counts = _duplicate_pairs(prepared, [tied.id, carried.id])
    _check_exact_merge(duplicated, counts, medoid)


def test_plan_matrices_sum_clusters_and_average_or_pick_centres():
    prepared = prepare_folded(fixture_path("residual_add"))
    group = max(prepared.analysis.prunable_groups, key=lambda g: g.size)
    scoring = Scoring.of(prepared.model, prepared.weights())
    for medoid in (False, True):
        plan = CentripetalSelect(scoring, medoid=medoid)(group, 5)
        assert plan.fold.shape == plan.merge.shape == (group.size, 5) and len(plan.keep) == 5
        assert set(np.unique(plan.fold)) == {0.0, 1.0} and np.all(plan.fold.sum(axis=1) == 1)
        assert np.all(plan.fold[plan.keep, np.arange(5)] == 1)  # a kept channel stands in its own cluster
        assert np.all((plan.merge != 0) <= (plan.fold != 0)) and np.allclose(plan.merge.sum(axis=0), 1)
        sizes = plan.fold.sum(axis=0)
        if medoid:
            assert np.all((plan.merge != 0).sum(axis=0) == 1)
        else:
            assert np.allclose(plan.merge, plan.fold / sizes)


def test_frozen_channels_stay_singletons_and_untouched():
    prepared = prepare_folded(fixture_path("residual_add"))
    group = max(prepared.analysis.prunable_groups, key=lambda g: g.size)
    frozen = np.zeros(group.size, dtype=bool)
    frozen[[1, 6, 7]] = True
    pinned = dataclasses.replace(group, frozen=frozen)
    select = CentripetalSelect(Scoring.of(prepared.model, prepared.weights()))
    plan = select(pinned, 5)
    for c in (1, 6, 7):
        j = int(np.searchsorted(plan.keep, c))
        assert plan.keep[j] == c
        assert np.array_equal(plan.fold[:, j], np.eye(group.size)[c])
        assert np.array_equal(plan.merge[:, j], np.eye(group.size)[c])
    only_frozen = select(pinned, 3)  # nothing left to merge into: the free channels go, the frozen stay
    assert only_frozen.keep.tolist() == [1, 6, 7] and np.array_equal(only_frozen.fold, np.eye(group.size)[:, [1, 6, 7]])
    with pytest.raises(ValueError):
        select(pinned, 2)


def test_the_allocator_drives_centripetal_to_a_mac_target():
    prepared = prepare_folded(fixture_path("depthwise"))
    analysis = prepared.analysis
    per_node = count_cost(prepared.model).per_node
    cost = CostModel.of(prepared.model, analysis, {n: c.macs for n, c in per_node.items()})
    scores = {g.id: np.ones(g.size) for g in analysis.prunable_groups}
    select = CentripetalSelect(Scoring.for_prepared(prepared))
    plan = Allocator(analysis, scores, cost).allocate(Target(macs=0.6), select=select)
    direct, details = method_plan(prepared, PruneOptions(method="centripetal", target_macs=0.6, allocation="uniform"),
                                  count_cost(prepared.model))
    stats = details["clusters"]
    assert {g: p.keep.tolist() for g, p in plan.groups.items()} == \
        {g: p.keep.tolist() for g, p in direct.groups.items()}
    merged = ApplyPlanPass(analysis, direct)(prepared.model).model
    onnx.checker.check_model(merged, full_check=True)
    assert abs(count_cost(merged).macs / count_cost(prepared.model).macs - 0.6) < 0.05
    assert [s["group"] for s in stats] == sorted(direct.groups)
    for s in stats:  # random weights: real clusters, with a spread to show (linear streams are pruned)
        assert sum(s["cluster_sizes"]) + s["pruned"] == s["size"] and len(s["cluster_sizes"]) == s["kept"] < s["size"]
        assert 0 < s["spread"] < 1.5 if not s["pruned"] else s["spread"] == 0
    assert any(s["pruned"] for s in stats) and any(not s["pruned"] for s in stats)


def _expand_depthwise_project(path, dw_differs: bool):
    """x -> Conv 1x1 (3 -> 6) -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1 (6 -> 4) -> y.  Channels 0 and 1 are
    identical everywhere; channels 2 and 3 have identical expand rows and, with `dw_differs`, different
    depthwise kernels (the rest random)."""
    from onnx import helper
    from invariants import save_graph
    rng = np.random.default_rng(5)
    expand = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    expand[1], expand[3] = expand[0], expand[2]
    depthwise = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    depthwise[1] = depthwise[0]
    if not dw_differs:
        depthwise[3] = depthwise[2]
    bias = np.array([0.5, 0.5, -0.3, -0.3, 0.1, 0.2], np.float32)
    weights = [onnx.numpy_helper.from_array(a, n) for a, n in
               ((expand, "we"), (bias, "be"), (depthwise, "wd"), (rng.standard_normal((4, 6, 1, 1)).astype(np.float32), "wp"))]
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
             helper.make_node("Relu", ["e"], ["er"], name="relu1"),
             helper.make_node("Conv", ["er", "wd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["dr"], name="relu2"),
             helper.make_node("Conv", ["dr", "wp"], ["y"], name="project")]
    return save_graph(path, "expand_dw", nodes, weights, [1, 3, 8, 8], [1, 4, 8, 8])


@pytest.mark.parametrize("medoid", [False, True], ids=["centroid", "medoid"])
def test_a_merge_across_a_depthwise_conv_with_unequal_kernels_does_not_happen(tmp_path, medoid):
    """Channels 2 and 3 share their expand rows but not their depthwise kernels: merging them (what clustering
    the producers alone did, averaging the kernels) changes the output; the one exact merge is channels 0
    and 1, identical in every layer."""
    prepared = prepare_folded(_expand_depthwise_project(tmp_path / "m.onnx", dw_differs=True))
    group = next(g for g in prepared.analysis.prunable_groups if g.size == 6)
    plan = CentripetalSelect(Scoring.for_prepared(prepared), medoid=medoid)(group, 5)
    merged_with = plan.keep[np.argmax(plan.fold, axis=1)]
    assert merged_with[0] == merged_with[1] and merged_with[2] != merged_with[3]
    merged = ApplyPlanPass(prepared.analysis, Plan({group.id: plan}))(prepared.model).model
    feeds = feeds_for(prepared.model, batch=1, samples=2)
    assert relative_error(run(prepared.model, feeds), run(merged, feeds)) < 1e-5


def test_channels_equal_across_the_depthwise_conv_still_merge_exactly(tmp_path):
    prepared = prepare_folded(_expand_depthwise_project(tmp_path / "m.onnx", dw_differs=False))
    group = next(g for g in prepared.analysis.prunable_groups if g.size == 6)
    plan = CentripetalSelect(Scoring.for_prepared(prepared))(group, 4)
    merged = ApplyPlanPass(prepared.analysis, Plan({group.id: plan}))(prepared.model).model
    feeds = feeds_for(prepared.model, batch=1, samples=2)
    assert relative_error(run(prepared.model, feeds), run(merged, feeds)) < 1e-5


def _linear_chain(path):
    """x -> Conv 3x3 (3 -> 8) -> Conv 1x1 (8 -> 4) -> y, nothing between the convs; channel 7 copies channel 6."""
    from onnx import helper
    from invariants import save_graph
    rng = np.random.default_rng(2)
    first = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    first[7] = first[6]
    weights = [onnx.numpy_helper.from_array(first, "w1"),
               onnx.numpy_helper.from_array(np.r_[rng.standard_normal(6), 0.7, 0.7].astype(np.float32), "b1"),
               onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    return save_graph(path, "linear", nodes, weights, [1, 3, 8, 8], [1, 4, 8, 8])


def test_a_linear_stream_is_pruned_by_bnvar_not_averaged(tmp_path):
    """No activation between producer and consumer: distinct channels are never averaged (that cost 2-3x the
    damage of pruning on the pretrained MobileNetV2's bottlenecks); the exact duplicate still folds in."""
    from onnx_prune.analysis.criteria import channel_scores
    from onnx_prune.passes.allocate import select_top

    prepared = prepare_folded(_linear_chain(tmp_path / "m.onnx"))
    group = prepared.analysis.prunable_groups[0]
    scoring = Scoring.for_prepared(prepared)
    select = CentripetalSelect(scoring)
    plan = select(group, 5)
    assert plan.merge is None and len(plan.keep) == 5
    merged_with = plan.keep[np.argmax(plan.fold, axis=1)]
    kept_twin = 6 if 6 in plan.keep else 7
    assert merged_with[6] == merged_with[7] == kept_twin and plan.fold[[6, 7]].sum() == 2
    scores = channel_scores(group, scoring, "bnvar", "domino-o")
    scores[13 - kept_twin] = -np.inf
    assert plan.keep.tolist() == select_top(scores, group.frozen, 5).tolist()
    assert select.stats[group.id].pruned == 2
