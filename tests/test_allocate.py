"""Allocation: kept counts, rounding, ties, exclusions."""
import numpy as np
import pytest

import onnx_prune
from onnx_prune.passes.allocate import Allocator, Target, kept_count, select_top
from onnx_prune.pipeline import prepare

from conftest import fixture_path
from invariants import conv_chain, save_graph


@pytest.mark.parametrize("size, ratio, round_to, frozen, expected", [
    (10, 0.3, 1, 0, 7), (64, 0.5, 1, 0, 32), (64, 0.3, 8, 0, 48), (10, 0.3, 8, 0, 8),
    (4, 0.9, 8, 0, 4), (16, 0.99, 1, 0, 1), (16, 0.99, 4, 0, 4), (16, 0.5, 1, 12, 12), (7, 0.0, 1, 0, 7),
])
def test_kept_count(size, ratio, round_to, frozen, expected):
    assert kept_count(size, ratio, round_to, frozen) == expected


def test_select_top_keeps_frozen_and_best_and_breaks_ties_by_index():
    scores = np.array([5.0, 1.0, 1.0, 9.0, 0.0])
    frozen = np.array([False, False, False, False, True])
    assert list(select_top(scores, frozen, 3)) == [0, 3, 4]
    assert list(select_top(scores, frozen, 4)) == [0, 1, 3, 4]


def test_exclude_keeps_the_matching_groups_whole():
    prepared = prepare(fixture_path("concat"))
    _, report = onnx_prune.prune(prepared, ratio=0.5, exclude=["conv1", "conv2*"])
    kept = {g.name: (g.kept, g.size) for g in report.groups}
    assert kept["conv1"] == (4, 4) and kept["conv2"] == (6, 6) and kept["conv0"][0] < kept["conv0"][1]


def test_protect_first_keeps_the_stem():
    _, report = onnx_prune.prune(fixture_path("concat"), ratio=0.5, protect_first=True)
    stem = next(g for g in report.groups if g.name == "conv0")
    assert stem.kept == stem.size


def test_global_allocation_respects_max_ratio_and_never_empties():
    prepared = prepare(fixture_path("residual_add"))
    _, report = onnx_prune.prune(prepared, ratio=0.6, allocation="global", max_ratio=0.5)
    for g in report.groups:
        if g.size - g.frozen > 0:
            assert g.kept >= g.size - int(0.5 * g.size) and g.kept >= 1
    total = sum(g.size for g in report.groups if g.size - g.frozen > 0)
    kept = sum(g.kept for g in report.groups if g.size - g.frozen > 0)
    assert kept < total


def _two_groups(spread_a: np.ndarray, spread_b: np.ndarray, comparable: bool = False) -> Allocator:
    """An allocator over two 8-channel groups of the residual fixture with the given scores."""
    analysis = prepare(fixture_path("residual_add")).analysis
    a, b = [g.id for g in analysis.prunable_groups if g.size == 8][:2]
    return Allocator(analysis, {a: spread_a, b: spread_b}, comparable=comparable), a, b


def test_global_takes_from_the_group_whose_channels_matter_least():
    # group a: four channels near zero next to four strong ones; group b: eight equal channels.  Removing 4 of
    # 16 globally takes exactly a's four weak ones (b's normalised scores are all 1); uniform takes 2 + 2.
    weak_strong, flat = np.array([0.01, 2, 0.01, 2, 0.01, 2, 0.01, 2]), np.ones(8)
    allocator, a, b = _two_groups(weak_strong, flat)
    global_plan = allocator.allocate(Target(ratio=0.25), "global")
    assert global_plan.groups[a].keep.tolist() == [1, 3, 5, 7] and b not in global_plan.groups
    uniform_plan = allocator.allocate(Target(ratio=0.25), "uniform")
    assert len(uniform_plan.groups[a].keep) == 6 and len(uniform_plan.groups[b].keep) == 6


def test_comparable_scores_rank_across_groups_as_they_are():
    # the same ranking within each group, but group b's channels matter 100x less in shared units: comparable
    # scores (bnvar) take all four from b; group-normalised ones see equal groups and split 2 + 2
    a_scores, b_scores = np.arange(1.0, 9.0), np.arange(1.0, 9.0) / 100
    allocator, a, b = _two_groups(a_scores, b_scores, comparable=True)
    plan = allocator.allocate(Target(ratio=0.25), "global")
    assert a not in plan.groups and plan.groups[b].keep.tolist() == [4, 5, 6, 7]
    allocator, a, b = _two_groups(a_scores, b_scores, comparable=False)
    plan = allocator.allocate(Target(ratio=0.25), "global")
    assert len(plan.groups[a].keep) == 6 and len(plan.groups[b].keep) == 6


@pytest.mark.parametrize("kwargs, words", [
    (dict(ratio=0.3, target_macs=0.5), "give one target"),
    (dict(target_macs=1.5), "fraction to keep"),
    (dict(max_ratio=0.0), "^max_ratio"),  # named as the API caller spelled it
    (dict(criterion="apoz"), "needs calibration data"),
    (dict(aggregate="sum"), "unknown aggregation"),
])
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(onnx_prune.PruneError, match=words):
        onnx_prune.prune(fixture_path("se"), **kwargs)


# --- the default rounding, --round-to size -----------------------------------------------------------------


def _chain(path, width: int, hw: int):
    """One prunable group of `width` channels whose layers do width * (27 + 4) * hw^2 MACs."""
    return conv_chain(path, width, 1, (hw, hw))


def _cost_model(prepared):
    from onnx_prune.passes.allocate import CostModel
    from onnx_prune.runtime.cost import count_cost

    cost = count_cost(prepared.model)
    return CostModel.of(prepared.model, prepared.analysis, {n: c.macs for n, c in cost.per_node.items()})


@pytest.mark.parametrize("size, step", [(4, 8), (16, 8), (64, 8), (127, 8), (128, 16), (255, 16), (2048, 16)])
def test_heavy_step_is_a_power_of_two_near_an_eighth_of_the_group_between_8_and_16(size, step):
    from onnx_prune.passes.allocate import heavy_step

    assert heavy_step(size) == step


@pytest.mark.parametrize("hw, step", [(64, 8), (8, 1)])
def test_size_rule_rounds_a_group_by_the_macs_its_width_sets(tmp_path, hw, step):
    from onnx_prune.passes.allocate import HEAVY_GROUP_MACS, group_macs, size_steps

    prepared = prepare(_chain(tmp_path / "chain.onnx", 16, hw))
    cost = _cost_model(prepared)
    group = next(g for g in prepared.analysis.groups if g.size == 16)
    assert group_macs(prepared.analysis, cost)[group.id] == 16 * (27 + 4) * hw * hw  # both convs, whole
    assert (16 * 31 * hw * hw >= HEAVY_GROUP_MACS) == (step == 8)
    assert size_steps(prepared.analysis, cost)[group.id] == step
    # the default is this rule: 16 channels at ratio 0.6 keep 7, rounded up to 8 where the group is heavy
    _, report = onnx_prune.prune(prepared, ratio=0.6, criterion="l2")
    assert report.options["round_to"] == "size"
    assert next(g.kept for g in report.groups if g.size == 16) == (8 if step == 8 else 7)


def test_size_rule_without_a_mac_count_goes_by_width():
    from onnx_prune.passes.allocate import HEAVY_GROUP_CHANNELS, heavy_step, size_steps

    analysis = prepare(fixture_path("residual_add")).analysis
    steps = size_steps(analysis, None)
    assert steps == {g.id: heavy_step(g.size) if g.size >= HEAVY_GROUP_CHANNELS else 1 for g in analysis.groups}


def test_size_rule_leaves_the_committed_fixtures_unrounded():
    """Their groups set at most 0.16 M MACs each: the default prunes them exactly as round_to=1 does."""
    from onnx_prune.passes.allocate import size_steps
    from onnx_prune.runtime.cost import count_cost

    checked = 0
    for path in sorted(fixture_path("se").parent.glob("*.onnx")):
        prepared = prepare(path)
        try:
            count_cost(prepared.model)
        except ValueError:  # dynamic spatial dims: no MAC count
            continue
        assert set(size_steps(prepared.analysis, _cost_model(prepared)).values()) == {1}, path.name
        checked += 1
    assert checked >= 15
    default, _ = onnx_prune.prune(fixture_path("residual_add"), ratio=0.3)
    unrounded, _ = onnx_prune.prune(fixture_path("residual_add"), ratio=0.3, round_to=1)
    assert default.SerializeToString() == unrounded.SerializeToString()


def test_default_rounding_reaches_a_mac_target_within_one_percent_on_mobilenet_v2():
    from conftest import zoo_model
    from onnx_prune.passes.allocate import heavy_step

    _, report = onnx_prune.prune(zoo_model("mobilenet_v2", "torchscript"), target_macs=0.7, criterion="l2")
    assert abs(report.macs_after / report.macs_before - 0.7) <= 0.007
    shrunk = [g for g in report.groups if g.kept < g.size]
    assert shrunk and all(g.kept % heavy_step(g.size) == 0 for g in shrunk)  # every conv group here is heavy


def _grouped(path, groups: int, width: int = 8, hw: int = 64):
    """x -> Conv(3 -> groups*width, 1x1) -> Relu -> grouped Conv(groups of `width`, 3x3) -> Relu -> Conv(-> 4):
    the grouped conv's channel slots are shared by its groups (RegNet's blocks)."""
    from onnx import helper, numpy_helper

    c, rng = groups * width, np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
               (("w1", (c, 3, 1, 1)), ("w2", (c, width, 3, 3)), ("w3", (4, c, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2", group=groups, pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["d"], name="relu2"),
             helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3")]
    return save_graph(path, "grouped", nodes, weights, [1, 3, hw, hw], [1, 4, hw, hw])


@pytest.mark.parametrize("groups, step, kept", [(4, 2, 6), (6, 4, 8), (13, 1, 6)])
def test_size_rule_aligns_the_width_of_slots_a_grouped_conv_shares(tmp_path, groups, step, kept):
    """8 slots shared by k conv groups make tensors 8k wide: the step keeps 8k's multiple of 8 (16 from 128 on)
    where a narrower count can, else (k odd) it does not round, rather than forbid pruning them."""
    from onnx_prune.passes.allocate import replication, size_steps

    prepared = prepare(_grouped(tmp_path / "g.onnx", groups))
    slots = [g for g in prepared.analysis.groups if g.size == 8]
    assert len(slots) == 2 and all(replication(prepared.analysis)[g.id] == groups for g in slots)
    assert all(size_steps(prepared.analysis, _cost_model(prepared))[g.id] == step for g in slots)
    model, report = onnx_prune.prune(prepared, ratio=0.3, criterion="l2")
    assert {g.kept for g in report.groups if g.size == 8} == {kept}  # 8 - 2 at ratio 0.3, rounded up to the step
    width = next(t.dims[0] for t in model.graph.initializer if t.name == "w1")
    assert width == groups * kept and (step == 1 or width % 8 == 0)
