import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.runtime.cost import Cost, NodeCost, count_cost, cost_ratio


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, initializers=(), outputs=("y",)):
    graph = helper.make_graph(nodes, "g", inputs, [_value(name, None) for name in outputs], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _single_op(op_type, x_shape, weight_shape, bias=False, **attributes):
    initializers = [_weight("W", weight_shape)]
    inputs = ["x", "W"]
    if bias:
        initializers.append(_weight("B", [weight_shape[0] if op_type != "ConvTranspose" else weight_shape[1]]))
        inputs.append("B")
    node = helper.make_node(op_type, inputs, ["y"], name="op", **attributes)
    return _model([node], [_value("x", x_shape)], initializers)


def test_plain_conv_counts_macs_and_params():
    # [1,3,8,8] * W[4,3,3,3] -> [1,4,6,6]: 4*6*6 outputs, 3*3*3 MACs each; bias adds no MACs.
    cost = count_cost(_single_op("Conv", [1, 3, 8, 8], [4, 3, 3, 3], bias=True))
    assert cost.macs == 4 * 6 * 6 * 3 * 3 * 3 == 3888
    assert cost.params == 4 * 3 * 3 * 3 + 4
    assert cost.per_node == {"op": NodeCost("Conv", 3888, 112)}


def test_grouped_conv():
    # group=2: Cin 4 -> each output channel sees 2 input channels.
    cost = count_cost(_single_op("Conv", [1, 4, 8, 8], [6, 2, 3, 3], group=2, pads=[1, 1, 1, 1]))
    assert cost.macs == 6 * 8 * 8 * 2 * 3 * 3 == 6912


def test_depthwise_conv():
    cost = count_cost(_single_op("Conv", [1, 8, 10, 10], [8, 1, 3, 3], group=8, pads=[1, 1, 1, 1]))
    assert cost.macs == 8 * 10 * 10 * 1 * 3 * 3 == 7200
    assert cost.params == 72


def test_strided_padded_conv_with_dynamic_batch():
    model = _single_op("Conv", ["N", 3, 9, 9], [5, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    # Hout = floor((9 + 2 - 3) / 2) + 1 = 5.
    assert count_cost(model).macs == 1 * 5 * 5 * 5 * 27 == 3375
    assert count_cost(model, batch=2).macs == 2 * 3375


def test_conv_transpose_plain_and_grouped():
    # Each input element scatters into W[Cin, Cout/group, kh, kw]'s (Cout/group)*kh*kw outputs.
    plain = count_cost(_single_op("ConvTranspose", [1, 4, 5, 5], [4, 3, 2, 2], bias=True, strides=[2, 2]))
    assert plain.macs == 4 * 5 * 5 * 3 * 2 * 2 == 1200
    assert plain.params == 4 * 3 * 2 * 2 + 3
    grouped = count_cost(_single_op("ConvTranspose", [1, 4, 5, 5], [4, 1, 3, 3], group=2))
    assert grouped.macs == 4 * 5 * 5 * 1 * 3 * 3 == 900


def test_gemm_with_transposes():
    # A[2,16] x B^T with B[10,16]: M=2, K=16, N=10.
    trans_b = count_cost(_single_op("Gemm", [2, 16], [10, 16], bias=True, transB=1))
    assert trans_b.macs == 2 * 16 * 10 == 320
    assert trans_b.params == 160 + 10
    trans_a = count_cost(_single_op("Gemm", [16, 2], [16, 10], transA=1))
    assert trans_a.macs == 320


def test_batched_broadcast_matmul():
    # [2,1,4,8] @ [3,8,5]: batch dims broadcast to [2,3], each a 4x8 @ 8x5 product.
    assert count_cost(_single_op("MatMul", [2, 1, 4, 8], [3, 8, 5])).macs == 2 * 3 * 4 * 8 * 5 == 960
    # A 1-D left operand is a single row.
    assert count_cost(_single_op("MatMul", [8], [8, 5])).macs == 40


def test_params_count_float_weights_once_and_skip_integer_tensors():
    shared = _weight("W", [4, 4, 1, 1])
    scale = helper.make_node(
        "Constant", [], ["scale"], value=numpy_helper.from_array(np.full([1, 4, 1, 1], 2, np.float32))
    )
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    unused = _weight("unused", [100])
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["a", "W"], ["b"], name="conv_b"),  # reuses W
        scale,
        helper.make_node("Mul", ["b", "scale"], ["c"], name="mul"),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="flatten"),
    ]
    cost = count_cost(_model(nodes, [_value("x", [1, 4, 3, 3])], [shared, shape, unused]))
    assert cost.params == 16 + 4  # W once, the Constant's 4 floats; int64 shape and unused weight excluded
    assert cost.per_node["conv_a"].params == cost.per_node["conv_b"].params == 16
    assert cost.per_node["mul"] == NodeCost("Mul", 0, 4)
    assert cost.macs == 2 * (4 * 3 * 3 * 4)


def test_large_weights_counted_without_touching_the_model():
    # 64*32*3*3 floats = 72 KiB: inferred without its data, the model itself stays intact.
    model = _single_op("Conv", ["N", 32, 16, 16], [64, 32, 3, 3], pads=[1, 1, 1, 1])
    before = model.SerializeToString()
    cost = count_cost(model, batch=2)
    assert cost.macs == 2 * 64 * 16 * 16 * 32 * 9
    assert cost.params == 64 * 32 * 9
    assert model.SerializeToString() == before


def test_initializers_listed_as_graph_inputs_are_not_inputs_to_fix():
    model = _single_op("Conv", [1, 3, 8, 8], [4, 3, 3, 3])
    model.graph.input.append(_value("W", [4, 3, 3, 3]))  # IR < 4 style
    assert count_cost(model).macs == 3888


def test_dynamic_spatial_dims_need_input_shapes():
    model = _single_op("Conv", ["N", 3, "height", "width"], [4, 3, 3, 3])
    with pytest.raises(ValueError, match=r"'x' dim 2 \('height'\)"):
        count_cost(model)
    assert count_cost(model, input_shapes={"x": [1, 3, 8, 8]}).macs == 3888
    # batch wins over the leading dim given in input_shapes.
    assert count_cost(model, input_shapes={"x": [1, 3, 8, 8]}, batch=4).macs == 4 * 3888


def test_cost_ratio():
    before, after = Cost(macs=1000, params=200, per_node={}), Cost(macs=250, params=150, per_node={})
    assert cost_ratio(before, after) == {
        "macs": {"before": 1000, "after": 250, "ratio": 0.25, "reduction": 0.75},
        "params": {"before": 200, "after": 150, "ratio": 0.75, "reduction": 0.25},
    }


def test_tf_same_pads_computed_from_shape_are_folded_not_run():
    # x [N,3,8,8]: conv0 3->8 k3 s2 "SAME" -> 4x4, depthwise k3 s2 -> 2x2, 1x1 8->16, Gemm 16->10
    import onnx

    from conftest import fixture_path

    model = onnx.load(str(fixture_path("tf_same_padding")))
    cost = count_cost(model)
    assert cost.macs == 8 * 4 * 4 * 27 + 8 * 2 * 2 * 9 + 16 * 2 * 2 * 8 + 10 * 16 == 4416
    assert count_cost(model, batch=3).macs == 3 * 4416


def test_folding_never_builds_large_tensors():
    from onnx_prune.runtime.shapes import FOLD_LIMIT, evaluate

    node = helper.make_node("ConstantOfShape", ["s"], ["y"])
    assert evaluate(node, [np.array([10**6, 10**6, 4000], np.int64)]) is None
    assert evaluate(node, [np.array([2, 3], np.int64)])[0].shape == (2, 3)
    expand = helper.make_node("Expand", ["a", "s"], ["y"])
    assert evaluate(expand, [np.ones((1, 1)), np.array([FOLD_LIMIT, 2], np.int64)]) is None
    div = helper.make_node("Div", ["a", "b"], ["y"])  # ONNX integer division truncates toward zero
    assert evaluate(div, [np.array([-7, 7], np.int64), np.array([2, 2], np.int64)])[0].tolist() == [-3, 3]


def test_unknown_shapes_give_partial_counts_on_request():
    model = _single_op("Conv", ["N", 3, "height", "width"], [4, 3, 3, 3])
    cost = count_cost(model, partial=True)
    assert cost.macs == 0 and "op" in cost.unknown and cost.params == 108
    assert cost.unknown_lines()[0].startswith("MACs unknown for node 'op': shape of 'y'")


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["shufflenet_v2_x1_0", "efficientnet_b0"])
def test_static_shapes_match_a_real_run_on_computed_shape_exports(name):
    """TorchScript computes ShuffleNetV2's chunk bounds and shuffle targets at run time; folding them must
    find every size a real onnxruntime run sees (the tool itself never runs the model for this)."""
    import onnx
    import onnxruntime as ort

    from conftest import zoo_model
    from onnx_prune.passes.normalize import NormalizeWeightsPass
    from onnx_prune.runtime.fidelity import make_inputs
    from onnx_prune.runtime.shapes import infer_shapes

    model = NormalizeWeightsPass()(onnx.load(str(zoo_model(name, "torchscript")))).model
    shapes = infer_shapes(model)
    names = [o for node in model.graph.node for o in node.output if o]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    measured = session.run(names, make_inputs(model, samples=1, batch=1)[0])
    for tensor, value in zip(names, measured):
        assert shapes[tensor] is not None and list(shapes[tensor][1:]) == list(value.shape[1:]), tensor
