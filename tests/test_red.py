"""RED (METHODS.md §2): adaptive hashing, exact merging of duplicate channels, uneven depthwise separation."""
import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import gaussian_kde

from conftest import fixture_path, zoo_model
from invariants import duplicate_model, feeds_for, relative_error, run
from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass
from onnx_prune.passes.hashing import (DEFAULT_BANDWIDTH, HashWeightsPass, density_grid, hash_values, kde_density,
                                       kernel_sigma)
from onnx_prune.passes.merge import MergeSearch, cluster_plan, keepers, merge_candidates, placement_counts
from onnx_prune.passes.uneven_depthwise import SeparateDepthwisePass, distinct_kernels
from onnx_prune.pipeline import prepare
from onnx_prune.red import METHOD_PRESETS, red
from onnx_prune.runtime.cost import count_cost

EXACT = 1e-4
NO_HASH = dict(hash_weights=False, separate_depthwise=False)


def mixture(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.laplace(0.0, 0.05, n), rng.normal(0.3, 0.02, n // 5)])


@pytest.mark.parametrize("bandwidth", [0.01, 0.05, 0.2])
def test_binned_kde_matches_scipy(bandwidth):
    values = mixture(2000)
    sigma = kernel_sigma(values, bandwidth)
    grid = density_grid(values, sigma)
    exact = gaussian_kde(values, bw_method=bandwidth)(grid.points())
    assert np.abs(kde_density(values, sigma, grid) - exact).max() < 3e-3 * exact.max()


def test_hashed_values_are_modes_of_their_bins():
    values = mixture(2000)
    hashed = hash_values(values, 0.05)
    assert len(np.unique(hashed)) < 20 < len(np.unique(values))
    exact = gaussian_kde(values, bw_method=0.05)
    step = density_grid(values, kernel_sigma(values, 0.05)).step
    for mode in np.unique(hashed):  # scipy's density peaks within one grid step of every mode
        around = exact(mode + np.linspace(-step, step, 41))
        assert 0 < np.argmax(around) < 40
    # every weight moves to a mode on its own side of the nearest density minimum: never far
    assert np.abs(hashed - values).max() < 0.5 * (values.max() - values.min())
    assert hashed.dtype == values.dtype


def test_hashing_keeps_fidelity_at_the_default_bandwidth():
    model = FoldBatchNormPass()(prepare(fixture_path("residual_add")).model).model
    result = HashWeightsPass()(model)
    hashed, details = result.model, result.details
    assert details["distinct_after"] * 3 < details["distinct_before"]
    feeds = feeds_for(model)
    assert relative_error(run(model, feeds), run(hashed, feeds)) < 0.1
    coarse = HashWeightsPass(bandwidth=10 * DEFAULT_BANDWIDTH)(model).model
    assert relative_error(run(model, feeds), run(coarse, feeds)) > relative_error(run(model, feeds), run(hashed, feeds))


def test_per_neuron_hashing_works_row_by_row():
    model = prepare(fixture_path("flatten_gemm")).model
    per_layer = HashWeightsPass(0.05)(model).details
    result = HashWeightsPass(0.05, per_neuron=True)(model)
    hashed, per_neuron = result.model, result.details
    assert per_neuron["distinct_after"] > per_layer["distinct_after"]  # more bins: one KDE per row
    param = per_neuron["layers"][0]["param"]
    conv = numpy_helper.to_array(next(t for t in hashed.graph.initializer if t.name == param))
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == param))
    np.testing.assert_array_equal(conv[1], hash_values(original[1], 0.05))


def duplicated(name: str, every: int, seed: int = 0):
    """A zoo model with one free channel made a copy of another in every `every`-th prunable group."""
    prepared = prepare(zoo_model(name, "torchscript"))
    rng = np.random.default_rng(seed)
    current = prepared
    groups = prepared.analysis.prunable_groups[::every]
    for group in groups:
        source, copy = rng.choice(np.nonzero(~group.frozen)[0], 2, replace=False)
        current = dataclasses.replace(current, model=duplicate_model(current, group, source, copy))
    return prepared.model, current.model, len(groups)


@pytest.mark.parametrize("name, every", [("resnet18", 4), ("mobilenet_v2", 3)])
def test_duplicate_channels_merge_exactly(name, every):
    original, model, n_duplicates = duplicated(name, every)
    merged, report = red(model, merge_tol=0.0, **NO_HASH)
    assert report.details["merge"]["merged"] == n_duplicates
    assert report.macs_after < report.macs_before
    feeds = feeds_for(model, batch=1)
    assert relative_error(run(model, feeds), run(merged, feeds)) < EXACT
    if name == "mobilenet_v2":
        _, untouched = red(original, merge_tol=0.0, **NO_HASH)  # random weights hold no duplicates
        assert untouched.details["merge"]["merged"] == 0


def test_merge_tolerance_merges_near_duplicates_too():
    prepared = prepare(fixture_path("residual_add"))
    group = max(prepared.analysis.prunable_groups, key=lambda g: g.size)
    model = duplicate_model(prepared, group, 0, 1)
    near = dataclasses.replace(prepared, model=duplicate_model(prepared, group, 2, 3))
    rng = np.random.default_rng(0)
    for tensor in near.model.graph.initializer:  # channel 3 = channel 2 + 0.1 % noise in its producers
        member = next((m for m in group.by_role("producer") if m.param == tensor.name), None)
        if member is not None:
            array = numpy_helper.to_array(tensor).copy()
            rows = np.moveaxis(array, member.axis, 0)
            row = member.positions[member.channels == 3]
            rows[row] *= 1 + 1e-3 * rng.standard_normal(rows[row].shape)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    both = duplicate_model(dataclasses.replace(prepared, model=near.model), group, 0, 1)
    _, exact = red(both, merge_tol=0.0, **NO_HASH)
    merged, loose = red(both, merge_tol=0.01, **NO_HASH)
    assert exact.details["merge"]["merged"] == 1 and loose.details["merge"]["merged"] == 2
    feeds = feeds_for(both)
    assert relative_error(run(both, feeds), run(merged, feeds)) < 0.01
    merged, report = red(model, merge_tol=0.0, **NO_HASH)  # BN folded, the exact duplicate merged
    assert report.details["merge"]["merged"] == 1 and relative_error(run(model, feeds), run(merged, feeds)) < EXACT


def test_frozen_channels_keep_themselves():
    labels = np.array([0, 0, 0, 1, 1])
    frozen = np.array([False, True, True, False, False])
    assert keepers(labels, frozen).tolist() == [1, 1, 2, 3, 3]  # the frozen 1 and 2 both stay
    plan = cluster_plan(np.array([1, 1, 2, 3, 3]), frozen, average=True)
    assert plan.keep.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(plan.fold.sum(axis=0), [2, 1, 2])  # consumers: the cluster's columns summed
    np.testing.assert_array_equal(plan.merge[:, 0], [0, 1, 0, 0, 0])  # a frozen keeper's rows stay as they are
    np.testing.assert_array_equal(plan.merge[:, 2], [0, 0, 0, 0.5, 0.5])


def test_channels_split_apart_do_not_merge():
    """Identical producers are not enough: channels sent to different branches meet different ops."""
    prepared = prepare(fixture_path("channel_shuffle"))
    counts = placement_counts(prepared.analysis)
    for group in prepared.analysis.groups:
        patterns = np.unique(counts[group.id], axis=0)
        if len(patterns) > 1:  # a group whose channels do not all flow through the same tensors
            zero = lambda name: np.zeros_like(prepared.weights()(name))  # noqa: E731 - every row identical
            search = MergeSearch([(group, merge_candidates(group, zero, counts[group.id], near=False))])
            kept = search.plan(0.0).plan.groups[group.id].keep
            assert len(kept) == len(patterns)  # one channel per pattern: all-zero rows merge only within it
            return
    pytest.fail("channel_shuffle has no group split across tensors")


def repeating_conv_model(n_in=16, n_out=48, per_channel=3, hw=16, seed=0) -> onnx.ModelProto:
    """Conv 3x3 (after a stem conv + Relu) whose input channel c holds only `per_channel` distinct kernels."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n_in, per_channel, 3, 3)).astype(np.float32)
    weight = bank[np.arange(n_in)[None, :], rng.integers(0, per_channel, (n_out, n_in))]
    weight[:, 0] = 0  # channel 0 unused: needs no depthwise channel at all
    inits = [numpy_helper.from_array(rng.standard_normal((n_in, 3, 3, 3)).astype(np.float32), "stem"),
             numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "stem"], ["s"], "stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "w", "b"], ["y"], "repeating", pads=[1, 1, 1, 1], strides=[2, 2])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out, hw // 2, hw // 2])]
    graph = helper.make_graph(nodes, "repeating", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_distinct_kernels_counts_repeats_per_input_channel():
    weight = numpy_helper.to_array(repeating_conv_model().graph.initializer[1])
    separation = distinct_kernels(weight)
    assert separation.size <= 15 * 3 and 0 not in separation.source
    rebuilt = np.einsum("oj,jhw->ohw", separation.coefficients(), separation.kernels)
    # summing filter o's kernels over channels = what the 1x1 conv does after the depthwise one
    np.testing.assert_allclose(rebuilt, weight.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_uneven_depthwise_separation_is_exact_and_cheaper():
    model = repeating_conv_model()
    result = SeparateDepthwisePass()(model)
    separated, decisions = result.model, result.details["decisions"]
    decision = next(d for d in decisions if d["node"] == "repeating")
    assert decision["applied"] and decision["macs_after"] < decision["macs_before"]
    assert not next(d for d in decisions if d["node"] == "stem")["applied"]  # random kernels: separating costs more MACs
    assert [n.op_type for n in separated.graph.node] == ["Conv", "Relu", "Gather", "Conv", "Conv"]
    onnx.checker.check_model(separated, full_check=True)
    feeds = feeds_for(model)
    assert relative_error(run(model, feeds), run(separated, feeds)) < EXACT
    assert count_cost(separated).macs < count_cost(model).macs


def test_separation_keeps_only_layers_measured_no_slower():
    model = repeating_conv_model(n_in=32, n_out=96, per_channel=2, hw=32)
    result = SeparateDepthwisePass(measure_latency=True, repeat=10)(model)
    out, decision = result.model, next(d for d in result.details["decisions"] if d["node"] == "repeating")
    assert decision["latency_before_ms"] > 0 and decision["latency_after_ms"] > 0
    assert decision["applied"] == (decision["latency_after_ms"] <= decision["latency_before_ms"])
    assert ("Gather" in [n.op_type for n in out.graph.node]) == decision["applied"]


def test_red_prunes_to_a_mac_target_after_merging():
    prepared = prepare(fixture_path("residual_add"))
    group = max(prepared.analysis.prunable_groups, key=lambda g: g.size)
    model = duplicate_model(prepared, group, 0, 1)
    pruned, report = red(model, target_macs=0.6, merge_to_target=False, **NO_HASH)
    assert report.details["merge"]["merged"] == 1 and report.details["merge"]["tol"] == 0
    assert report.details["pruned"] > 0
    assert abs(report.macs_after / report.macs_before - 0.6) < 0.01
    onnx.checker.check_model(pruned)


def test_red_raises_the_merge_tolerance_to_reach_a_target():
    model = fixture_path("residual_add")
    _, none = red(model, target_macs=1.0, **NO_HASH)  # nothing to do: no merge, no prune
    assert none.details["merge"]["tol"] == 0 and none.details["merge"]["merged"] == 0
    assert none.details["pruned"] == 0
    _, loose = red(model, merge_tol=1.3, max_merge_tol=1.5, **NO_HASH)
    goal = loose.macs_after / loose.macs_before + 0.02  # what merging at tolerance 1.3 reaches, and a bit
    pruned, report = red(model, target_macs=goal, max_merge_tol=1.5, **NO_HASH)
    # merging takes what it can without passing the target (the largest such tolerance), pruning the rest:
    # the target is met closely instead of overshot by the tolerance's coarse steps
    assert 0 < report.details["merge"]["tol"] <= 1.5 and report.details["merge"]["merged"] > 0
    assert abs(report.macs_after / report.macs_before - goal) <= 0.02 * goal
    _, capped = red(model, target_macs=goal, max_merge_tol=0.1, **NO_HASH)  # merging cannot: pruning does the rest
    assert capped.details["merge"]["tol"] == 0.1 and capped.details["pruned"] > 0


def test_hash_method_reports_distinct_values_per_layer():
    model, report = red(fixture_path("se"), **METHOD_PRESETS["hash"])
    hashed = report.details["HashWeightsPass"]
    layers = hashed["layers"]
    assert "merge" not in report.details and "SeparateDepthwisePass" not in report.details
    assert layers and all(l["after"] <= l["before"] for l in layers)
    assert hashed["distinct_after"] < hashed["distinct_before"]
    assert report.macs_after == report.macs_before
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(len(np.unique(weights[l["param"]])) == l["after"] for l in layers)


def _nearly_off_channels(path):
    """x -> Conv 1x1 (4 -> 8, bias) -> Clip(0, 6) -> Conv 1x1 (8 -> 3) -> y.  Channels 0-3: small, unrelated
    weights under one large negative bias (sparse detectors, nearly off: what EfficientNet-Lite0 has hundreds
    of); channel 5 is channel 4 with 0.1 % noise on its weights."""
    from invariants import save_graph
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    weight[:4] *= 0.05
    weight[5] = weight[4] * (1 + 1e-3 * rng.standard_normal(weight[4].shape)).astype(np.float32)
    bias = np.r_[[-1.4] * 4, 0.3, 0.3, 0.1, -0.2].astype(np.float32)
    weights = [numpy_helper.from_array(weight, "w1"), numpy_helper.from_array(bias, "b1"),
               numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi"),
               numpy_helper.from_array(rng.standard_normal((3, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    return save_graph(path, "nearly_off", nodes, weights, [1, 4, 6, 6], [1, 3, 6, 6])


def test_a_shared_bias_does_not_make_channels_near_duplicates(tmp_path):
    """Relative distance is taken against the filters' weight norm: four nearly-off channels whose rows are
    dominated by the same bias are far apart (relative to the whole row they were within 5 % and merged into
    one); the real near-duplicate (0.1 % apart) still merges."""
    prepared = prepare(_nearly_off_channels(tmp_path / "m.onnx"))
    group = prepared.analysis.prunable_groups[0]
    counts = placement_counts(prepared.analysis)[group.id]
    (candidates,) = merge_candidates(group, prepared.weights(), counts, near=True)
    assert candidates.distance[:4, :4][~np.eye(4, dtype=bool)].min() > 0.5
    assert candidates.distance[4, 5] < 0.01
    merged, report = red(str(tmp_path / "m.onnx"), merge_tol=0.3, **NO_HASH)
    assert report.details["merge"]["merged"] == 1
    feeds = feeds_for(prepared.model)
    assert relative_error(run(prepared.model, feeds), run(merged, feeds)) < 0.01
