"""Least-squares repair: im2col against onnxruntime, the ridge fit, and held-out errors that really fall."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.pipeline import method_plan, prepare_folded
from onnx_prune.analysis.layers import weight_axes
from onnx_prune.passes.base import Pass
from onnx_prune.passes.repair import (Layer, LeastSquaresRepairPass, fit_grid, format_table, intermediate_tensors,
                                      layer_rows, repair)
from onnx_prune.runtime.calibration import feed_batches
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import PruneOptions, build_plan, prepare
from onnx_prune.runtime.cost import count_cost

from conftest import fixture_path, zoo_model
from invariants import feeds_for, relative_error, run


def _model(nodes, inits, x_shape, out_name, out_shape):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 2, 1]),
    dict(kernel_shape=[3, 2], dilations=[2, 1], pads=[2, 1, 2, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 1], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[1, 1], strides=[2, 2], auto_pad="VALID"),
], ids=["plain", "stride-asym-pad", "dilation", "same-upper", "same-lower", "valid"])
def test_im2col_rows_times_weights_are_the_conv_output(attrs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3) + tuple(attrs["kernel_shape"]))
    b = rng.standard_normal(5)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    model = _model([node], {"w": w, "b": b}, [2, 3, 9, 11], "y", ["n", 5, "h", "w"])
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    y = run(model, [{"x": x}])[0]
    layer = Layer(model.graph.node[0])
    rows = np.arange(y.size // y.shape[1])
    features = layer_rows(layer, x, y.shape, w.shape[2:], rows)
    theta = layer.theta({"w": w, "b": b})
    expected = np.moveaxis(y, 1, -1).reshape(-1, 5)
    assert np.allclose(features @ theta, expected, atol=1e-4)


def test_the_ridge_grid_starts_at_the_given_amount_and_ends_with_bias_only():
    assert fit_grid(1e-3) == (1e-3, 1e-2, 0.1, 1.0, 10.0, np.inf)
    assert fit_grid(0.0)[0] == 0.0 and fit_grid(0.05)[:2] == (0.05, 0.1)


def test_feeds_are_batched_only_along_a_dynamic_batch_dim():
    dynamic = prepare(fixture_path("residual_add")).model
    feeds = feeds_for(dynamic, batch=1, samples=40)
    runs = feed_batches(feeds, 16, True)
    assert [len(r["x"]) for r, _ in runs] == [16, 16, 8]
    assert np.array_equal(np.concatenate([r["x"] for r, _ in runs]), np.concatenate([f["x"] for f in feeds]))
    assert np.array_equal(np.concatenate([samples for _, samples in runs]), np.arange(40))
    fixed = feed_batches(feeds, 16, False)
    assert len(fixed) == 40 and all(r is f for (r, _), f in zip(fixed, feeds))


def _pruned(prepared, ratio=0.5):
    plan = build_plan(prepared, PruneOptions(ratio=ratio), count_cost(prepared.model))
    return plan, ApplyPlanPass(prepared.analysis, plan)(prepared.model).model


def _check_repair(prepared, plan, reduced, calib, test, **options):
    repaired, report = repair(prepared.model, reduced, calib, prepared.analysis, plan, **options)
    onnx.checker.check_model(repaired, full_check=True)
    assert report["layers"] and not report["skipped"]
    assert any(layer["applied"] for layer in report["layers"])
    for layer in report["layers"]:  # a layer changes only where held-out sources say it gets closer
        assert layer["applied"] == (layer["error_after"] < layer["error_before"]), layer
    original = run(prepared.model, test)
    assert relative_error(original, run(repaired, test)) < 0.5 * relative_error(original, run(reduced, test))
    return repaired, report


@pytest.mark.parametrize("name", ["residual_add", "depthwise", "concat", "se", "nhwc_transpose"])
def test_repair_after_pruning_lowers_every_layer_error_and_the_output_error(name):
    prepared = prepare(fixture_path(name))
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=12)
    _check_repair(prepared, plan, reduced, calib, feeds_for(prepared.model, seed=2, batch=4, samples=4))


@pytest.mark.parametrize("name", ["residual_add", "depthwise"])
def test_repair_after_centripetal_merging(name):
    prepared = prepare_folded(fixture_path(name))
    plan, _ = method_plan(prepared, PruneOptions(method="centripetal", target_macs=0.5), count_cost(prepared.model))
    reduced = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=12)
    _, report = _check_repair(prepared, plan, reduced, calib, feeds_for(prepared.model, seed=2, batch=4, samples=4))
    waves = [layer["wave"] for layer in report["layers"]]
    assert waves == sorted(waves) and waves[-1] > 0
    assert all(layer["node"] in format_table(report) for layer in report["layers"])


def test_layers_that_see_repaired_inputs_beat_one_pass_over_the_reduced_model():
    prepared = prepare(fixture_path("depthwise"))
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=12)
    test = feeds_for(prepared.model, seed=2, batch=4, samples=4)
    original = run(prepared.model, test)
    errors = {}
    for sequential in (True, False):
        repaired, report = repair(prepared.model, reduced, calib, prepared.analysis, plan, sequential=sequential)
        assert ({layer["wave"] for layer in report["layers"]} != {0}) == sequential
        errors[sequential] = relative_error(original, run(repaired, test))
    assert errors[True] < errors[False] < relative_error(original, run(reduced, test))


def _odd_layers_model():
    """Convs without bias (asymmetric pads, stride, dilation), a Gemm with alpha, beta and no transB."""
    rng = np.random.default_rng(0)
    inits = {"w0": rng.standard_normal((8, 3, 3, 3)), "w1": 0.3 * rng.standard_normal((8, 8, 3, 3)),
             "fc.w": rng.standard_normal((8, 10)), "fc.b": rng.standard_normal(10)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 0, 2, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3], dilations=[2, 2],
                         pads=[2, 1, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", alpha=0.5, beta=2.0),
    ]
    return _model(nodes, inits, ["N", 3, 12, 12], "logits", ["N", 10])


def test_the_written_weights_are_the_fitted_ones():
    """The refit is stored correctly (bias added to bias-less convs, Gemm alpha/beta undone): with every
    position used, the repaired model's own error of each layer on the calibration data is what the moments
    give for the weights read back, and it is below the unrepaired layer's (a ridge fit never rises in-sample)."""
    prepared = prepare(_odd_layers_model())
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=8)
    repaired, report = repair(prepared.model, reduced, calib, prepared.analysis, plan, rows=10 ** 7, batch=1)
    assert [(l["node"], l["applied"]) for l in report["layers"]] == [("conv1", True), ("fc", True)]
    assert "conv1.repair_bias" in {t.name for t in repaired.graph.initializer}

    def output(model, name):
        return np.concatenate([o[name] for o in intermediate_tensors(model, [name], calib)])

    weights = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    for layer in report["layers"]:
        node = next(n for n in repaired.graph.node if n.name == layer["node"])
        original = output(prepared.model, node.output[0])
        if layer["node"] == "conv1":  # its own outputs were pruned too: the target is the kept ones
            gid = int(prepared.analysis.id_group[prepared.analysis.layouts["c1"].ids[0]])
            original = original[:, plan.groups[gid].keep]
        mine, before = output(repaired, node.output[0]), output(reduced, node.output[0])
        assert np.linalg.norm(mine - original) < np.linalg.norm(before - original)
        x = np.concatenate([o[node.input[0]] for o in intermediate_tensors(repaired, [node.input[0]], calib)])
        rows = np.arange(mine.size // mine.shape[1])
        features = layer_rows(Layer(node), x, mine.shape, weights[node.input[1]].shape[2:], rows)
        predicted = features @ Layer(node).theta(weights)
        assert np.allclose(predicted, np.moveaxis(mine, 1, -1).reshape(len(rows), -1), atol=1e-4)


def test_a_refit_that_does_not_generalise_is_refused():
    """flatten_gemm: the Gemm reads 16 columns per kept channel (33 features) from 48 samples, so an
    unregularised refit of its weights overfits; cross-validation over held-out samples picks a strong
    shrinkage toward the old weights (or bias-only compensation), never the least-squares fit."""
    prepared = prepare(fixture_path("flatten_gemm"))
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=12)
    repaired, report = repair(prepared.model, reduced, calib, prepared.analysis, plan, ridge=0.0, batch=1)
    [layer] = report["layers"]
    assert (layer["features"], layer["rows"], report["samples"], report["folds"]) == (33, 48, 48, 4)
    assert layer["ridge"] >= 1.0 and layer["applied"]
    assert layer["error_after"] <= layer["error_compensation"] < layer["error_before"]
    free, _ = repair(prepared.model, reduced, calib, prepared.analysis, plan, ridge=0.0, batch=1)
    assert free.SerializeToString() == repaired.SerializeToString()  # deterministic


def test_held_out_folds_follow_the_sources():
    """Samples from 3 sources, interleaved: with the sources given, each fold holds whole sources."""
    prepared = prepare(fixture_path("residual_add"))
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=12)
    sources = np.arange(12) % 3
    _, report = repair(prepared.model, reduced, calib, prepared.analysis, plan, sources=sources)
    assert (report["folds"], report["split"]) == (4, "by source")
    folds = LeastSquaresRepairPass(prepared.model, prepared.analysis, plan, calib, sources=sources).fold_of
    assert [len(set(folds[sources == s].tolist())) for s in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 sources"):
        repair(prepared.model, reduced, calib, prepared.analysis, plan, sources=np.zeros(12))


def test_the_repair_pass_says_what_it_did_in_its_details():
    """One entry point: the repair is a contract-checked `Pass`, and its report is `PassResult.details`, as plain
    data (JSON round-trips it), not state left on the pass; `repair` is that pass called once."""
    prepared = prepare(fixture_path("residual_add"))
    plan, reduced = _pruned(prepared)
    calib = feeds_for(prepared.model, seed=1, batch=4, samples=12)
    repair_pass = LeastSquaresRepairPass(prepared.model, prepared.analysis, plan, calib)
    result = repair_pass(reduced)
    assert isinstance(repair_pass, Pass) and not hasattr(repair_pass, "report")
    assert result.modified == any(layer["applied"] for layer in result.details["layers"]) is True
    assert json.loads(json.dumps(result.details)) == result.details
    before = {t.name: list(t.dims) for t in prepared.model.graph.initializer}
    after = {t.name: list(t.dims) for t in reduced.graph.initializer}
    narrowed = {n.name for n in reduced.graph.node if n.op_type in ("Conv", "Gemm")
                and after[n.input[1]][weight_axes(n, 2)[1]] < before[n.input[1]][weight_axes(n, 2)[1]]}
    assert {layer["node"] for layer in result.details["layers"]} == narrowed == {"conv1", "conv2", "conv3", "conv4",
                                                                                 "fc"}
    model, details = repair(prepared.model, reduced, calib, prepared.analysis, plan)
    assert model.SerializeToString() == result.model.SerializeToString() and details == result.details


def test_a_model_that_is_not_the_plans_original_is_refused():
    prepared = prepare(fixture_path("residual_add"))
    plan, reduced = _pruned(prepared)
    other = prepare(fixture_path("concat")).model
    with pytest.raises(ValueError, match="differs"):
        repair(other, reduced, feeds_for(other, samples=2), prepared.analysis, plan)


@pytest.mark.zoo
def test_repair_on_a_pruned_zoo_model():
    prepared = prepare(zoo_model("squeezenet1_1", "torchscript"))
    plan, reduced = _pruned(prepared, 0.3)
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=4)
    test = feeds_for(prepared.model, seed=2, batch=1, samples=2)
    _check_repair(prepared, plan, reduced, calib, test, rows=1024)
