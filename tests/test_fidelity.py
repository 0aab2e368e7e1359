import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.runtime import sessions
from onnx_prune.runtime.fidelity import compare, format_fidelity_table, load_npz_inputs, make_inputs

CLASSES = 10


def _weight(name, shape, seed):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _classifier(tail=()):
    """x[N,3,8,8] -> conv -> "features"[N,4,8,8] and "logits"[N,10]; `tail` nodes rewrite "scores" into "logits"."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["features"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "G"], ["logits" if not tail else "scores"], transB=1),
        *tail,
    ]
    initializers = [_weight("W", [4, 3, 3, 3], 1), _weight("G", [CLASSES, 4], 2)]
    initializers += [
        numpy_helper.from_array(np.array(2, np.float32), "two"),
        numpy_helper.from_array(np.arange(CLASSES)[::-1].astype(np.int64), "reverse"),
        numpy_helper.from_array(np.array([1, 0, 2, 3], np.int64), "swap01"),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, 8, 8]),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, inputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in inputs]


@pytest.fixture
def inputs():
    return make_inputs(_classifier(), seed=0, samples=4, batch=8)


def test_identical_copy_is_exact(inputs):
    original = _classifier()
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    report = compare(original, copy, inputs)
    assert report.samples == 4 and report.provider == "CPUExecutionProvider"
    assert [output.name for output in report.outputs] == ["logits", "features"]
    for output in report.outputs:
        assert output.max_abs_error == 0.0
        assert output.relative_error == 0.0
        assert output.cosine_similarity == pytest.approx(1.0, abs=1e-12)
        assert output.top1_agreement == 1.0  # [N,10] scores and [N,4,H,W] per-pixel scores
    assert report.outputs[0].shape == (8, CLASSES)


def test_doubled_output_has_relative_error_one(inputs):
    doubled = _classifier([helper.make_node("Mul", ["scores", "two"], ["logits"])])
    report = compare(_classifier(), doubled, inputs)
    logits = report.outputs[0]
    reference = np.stack([run[0] for run in _run(_classifier(), inputs)])
    assert logits.relative_error == 1.0  # ||2y - y|| / ||y||
    assert logits.max_abs_error == float(np.abs(reference).max())
    assert logits.cosine_similarity == pytest.approx(1.0, abs=1e-12)
    assert logits.top1_agreement == 1.0
    assert report.outputs[1].max_abs_error == 0.0  # features untouched


def test_permuted_class_scores_lower_agreement(inputs):
    reversed_classes = _classifier([helper.make_node("Gather", ["scores", "reverse"], ["logits"], axis=1)])
    report = compare(_classifier(), reversed_classes, inputs)
    reference = np.concatenate([run[0] for run in _run(_classifier(), inputs)])
    expected = np.mean(reference.argmax(1) == reference[:, ::-1].argmax(1))
    assert report.outputs[0].top1_agreement == expected < 1.0
    assert report.outputs[0].relative_error > 0.1


def test_per_pixel_agreement_for_segmentation_scores(inputs):
    # Swap channels 0 and 1 of the 4-D feature map, as a pruned model with a wrong channel order would.
    original = _classifier()
    swapped = _classifier()
    swapped.graph.node[0].output[0] = "raw"
    swapped.graph.node.append(helper.make_node("Gather", ["raw", "swap01"], ["features"], axis=1))
    swapped.graph.node[1].input[0] = "raw"
    report = compare(original, swapped, inputs)
    features = np.stack([run[1] for run in _run(original, inputs)])  # [S, N, 4, H, W]
    expected = np.mean(features.argmax(2) == features[:, :, [1, 0, 2, 3]].argmax(2))
    assert report.outputs[1].top1_agreement == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    assert report.outputs[0].max_abs_error == 0.0


def test_compare_from_paths_and_through_a_temporary_file(inputs, tmp_path, monkeypatch):
    original, doubled = _classifier(), _classifier([helper.make_node("Mul", ["scores", "two"], ["logits"])])
    onnx.save(original, tmp_path / "a.onnx")
    onnx.save(doubled, tmp_path / "b.onnx")
    from_paths = compare(tmp_path / "a.onnx", tmp_path / "b.onnx", inputs)
    assert from_paths.outputs[0].relative_error == 1.0
    # Models past the protobuf limit go through model.onnx + weights.bin; fake a tiny limit.
    monkeypatch.setattr(sessions, "PROTO_LIMIT_BYTES", 0)
    snapshot = doubled.SerializeToString()
    through_file = compare(original, doubled, inputs)
    assert through_file.to_dict() == from_paths.to_dict()
    assert doubled.SerializeToString() == snapshot


def test_output_shape_mismatch_is_an_error(inputs):
    narrower = _classifier([helper.make_node("Slice", ["scores", "starts", "ends", "axes"], ["logits"])])
    narrower.graph.initializer.extend(
        numpy_helper.from_array(np.array([value], np.int64), name)
        for name, value in (("starts", 0), ("ends", 5), ("axes", 1))
    )
    with pytest.raises(ValueError, match=r"output 'logits': original shape \[8, 10\], pruned \[8, 5\]"):
        compare(_classifier(), narrower, inputs)


def test_report_serialises_and_formats(inputs):
    report = compare(_classifier(), _classifier([helper.make_node("Mul", ["scores", "two"], ["logits"])]), inputs)
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["outputs"][0]["relative_error"] == 1.0
    assert as_json["outputs"][1]["top1_agreement"] == 1.0
    table = format_fidelity_table(report).splitlines()
    assert table[0] == "fidelity over 4 sample(s) on CPUExecutionProvider"
    assert table[3].split()[:4] == ["logits", "[8,", "10]", f"{report.outputs[0].max_abs_error:.3e}"]
    assert table[3].split()[4:] == ["1.00e+00", "1.000000", "100.00%"]


def _mixed_input_model():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["ids"], ["z"])],
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_make_inputs_fills_dynamic_dims_deterministically():
    model = _mixed_input_model()
    feeds = make_inputs(model, seed=3, shapes={"x": [1, 3, 16, 12]}, samples=2, batch=2)
    assert len(feeds) == 2
    assert feeds[0]["x"].shape == (2, 3, 16, 12) and feeds[0]["x"].dtype == np.float32
    assert feeds[0]["ids"].shape == (2, 5) and feeds[0]["ids"].dtype == np.int64
    assert feeds[0]["ids"].min() >= 0 and feeds[0]["ids"].max() < 8
    assert feeds[0]["mask"].dtype == np.bool_
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])
    again = make_inputs(model, seed=3, shapes={"x": [1, 3, 16, 12]}, samples=2, batch=2)
    assert all(np.array_equal(a[name], b[name]) for a, b in zip(feeds, again) for name in a)
    # Without batch, the leading dim defaults to 1 (or comes from shapes).
    assert make_inputs(model, shapes={"x": [4, 3, 2, 2]}, samples=1)[0]["ids"].shape == (1, 5)


def test_make_inputs_names_a_missing_dynamic_dim():
    with pytest.raises(ValueError, match=r"input 'x' dim 2 \('H'\) is dynamic"):
        make_inputs(_mixed_input_model())
    with pytest.raises(ValueError, match=r"model fixes that dim to 2"):
        make_inputs(_mixed_input_model(), shapes={"x": [1, 3, 4, 4], "mask": [3]})


def test_load_npz_inputs(tmp_path):
    model = _classifier()
    stacked = np.random.default_rng(0).standard_normal([3, 2, 3, 8, 8])  # float64: cast to float32
    np.savez(tmp_path / "stacked.npz", x=stacked)
    samples = load_npz_inputs(tmp_path / "stacked.npz", model)
    assert len(samples) == 3
    assert samples[2]["x"].dtype == np.float32 and np.allclose(samples[2]["x"], stacked[2])
    # an array of the input's rank is N samples along the (dynamic) batch axis: one feed each
    np.savez(tmp_path / "single.npz", x=stacked[0])
    split = load_npz_inputs(tmp_path / "single.npz", model)
    assert len(split) == 2 and split[1]["x"].shape == (1, 3, 8, 8) and np.allclose(split[1]["x"][0], stacked[0, 1])
    # a single-input model takes the one array whatever its name; two candidates are ambiguous
    np.savez(tmp_path / "renamed.npz", image=stacked[0])
    assert len(load_npz_inputs(tmp_path / "renamed.npz", model)) == 2
    np.savez(tmp_path / "misnamed.npz", image=stacked[0], other=stacked[1])
    with pytest.raises(ValueError, match=r"missing arrays for \['x'\], unknown arrays \['image', 'other'\]"):
        load_npz_inputs(tmp_path / "misnamed.npz", model)
    np.savez(tmp_path / "flat.npz", x=stacked[0, 0, 0])
    with pytest.raises(ValueError, match=r"'x' has rank 2; the model input has rank 4"):
        load_npz_inputs(tmp_path / "flat.npz", model)
