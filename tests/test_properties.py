"""Property-based tests: random small CNNs (Conv/BN/activation/Add/Concat/depthwise/Flatten->Gemm, random widths
and wiring, float32 and float16) must keep the design's invariants.

- zero channels: channels zeroed in every producer and carrier of their group are removed exactly (relative error
  < 1e-4), and the result passes check_model(full_check=True) with its output shapes kept;
- duplicate channels: RED without hashing and with merge tolerance 0 merges exact duplicates exactly.

The default profile ("ci", see conftest.py) runs a CI-sized number of examples; `--hypothesis-profile=long` runs
many more for benchmarks.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import assume, given, strategies as st
from onnx import helper, numpy_helper

import onnx_prune
from onnx_prune.pipeline import prepare

from invariants import duplicate_model, relative_error, zero_channels_choice, zero_model

ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Tanh", "HardSwish", None)  # each maps 0 to 0
N_OUT = 5
SPATIAL = 8


class Net:
    """Nodes and weights of one random model, named uniquely and deterministically."""

    def __init__(self, rng: np.random.Generator, dtype: type):
        self.rng, self.dtype = rng, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, prefix: str, *shape: int, scale: float = 0.5, positive: bool = False) -> str:
        name = self.name(prefix)
        value = self.rng.uniform(0.5, 1.5, shape) if positive else self.rng.standard_normal(shape) * scale
        self.inits.append(numpy_helper.from_array(value.astype(self.dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        w = self.weight("w", cout, cin // group, k, k, scale=1.0 / np.sqrt(cin // group * k * k))
        return self.op("Conv", [x, w, self.weight("b", cout, scale=0.1)], kernel_shape=[k, k], pads=[k // 2] * 4,
                       group=group)

    def bn(self, x: str, c: int) -> str:
        return self.op("BatchNormalization", [x, self.weight("gamma", c, positive=True), self.weight("beta", c),
                                              self.weight("mean", c, scale=0.1),
                                              self.weight("var", c, positive=True)])

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        if kind == "Clip":
            zero, six = (self._scalar(v) for v in (0.0, 6.0))
            return self.op("Clip", [x, zero, six])
        if kind == "LeakyRelu":
            return self.op("LeakyRelu", [x], alpha=0.1)
        return self.op(kind, [x])

    def _scalar(self, value: float) -> str:
        name = self.name("s")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=self.dtype), name))
        return name


@st.composite
def cnn(draw, dtypes=(np.float32, np.float16)) -> onnx.ModelProto:
    dtype = draw(st.sampled_from(dtypes))
    net = Net(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), dtype)
    c = draw(st.integers(1, 3))
    h, c_in = "x", c

    def layer(x: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        y = net.conv(x, cin, cout, k, group)
        if draw(st.booleans()):
            y = net.bn(y, cout)
        return net.act(y, draw(st.sampled_from(ACTIVATIONS)))

    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "depthwise", "residual", "concat"]))
        if kind == "conv":
            width = draw(st.integers(2, 8))
            h, c = layer(h, c, width, draw(st.sampled_from([1, 3]))), width
        elif kind == "depthwise":
            h = layer(h, c, c, 3, group=c)
        elif kind == "residual":
            h = net.op("Add", [layer(layer(h, c, c, 3), c, c, 1), h])
        else:
            a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            h, c = net.op("Concat", [layer(h, c, a, 1), layer(h, c, b, 3)], axis=1), a + b
    if draw(st.booleans()):  # global pooling head
        flat, features = net.op("Flatten", [net.op("GlobalAveragePool", [h])], axis=1), c
    else:  # Flatten of the feature map: each channel owns a block of Gemm columns
        pooled = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
        flat, features = net.op("Flatten", [pooled], axis=1), c * (SPATIAL // 2) ** 2
    fc_w = net.weight("fc.w", N_OUT, features, scale=1.0 / np.sqrt(features))
    net.nodes.append(helper.make_node("Gemm", [flat, fc_w, net.weight("fc.b", N_OUT)], ["logits"], name="fc",
                                      transB=1))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(net.nodes, "random_cnn",
                              [helper.make_tensor_value_info("x", elem, ["N", c_in, SPATIAL, SPATIAL])],
                              [helper.make_tensor_value_info("logits", elem, ["N", N_OUT])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model: onnx.ModelProto, seed: int) -> list[dict]:
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(dims).astype(dtype)} for _ in range(2)]


def _run(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate(outs).astype(np.float64) for outs in zip(*(session.run(None, f) for f in feeds))]


def _checked(pruned: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict]) -> float:
    """check_model(full_check=True), same output shapes; returns the relative error against `reference`."""
    onnx.checker.check_model(pruned, full_check=True)
    before, after = _run(reference, feeds), _run(pruned, feeds)
    assert [a.shape for a in before] == [a.shape for a in after]
    return relative_error(before, after)


@given(model=cnn(), seed=st.integers(0, 2**16))
def test_zeroed_channels_are_removed_exactly(model, seed):
    prepared = prepare(model)
    chosen = zero_channels_choice(prepared, seed)
    assume(chosen)
    zeroed = zero_model(prepared, chosen)
    pruned, report = onnx_prune.prune(zeroed, ratio=0.3, criterion="l1")
    assert report.channels_after == report.channels_before - sum(len(r) for r in chosen.values())
    assert _checked(pruned, zeroed, _feeds(model, seed)) < 1e-4


# float32 only: on float16 models RED's BatchNorm folding fails its own postcondition (FoldBatchNormPass checks
# the function to a relative 1e-4, below float16 rounding) -- reported, not this test's to loosen.
@given(model=cnn(dtypes=(np.float32,)), seed=st.integers(0, 2**16))
def test_duplicated_channels_merge_exactly(model, seed):
    prepared = prepare(model)
    rng = np.random.default_rng(seed)
    groups = [g for g in prepared.analysis.prunable_groups if g.prunable >= 2]
    assume(groups)
    group = groups[int(rng.integers(len(groups)))]
    free = np.nonzero(~group.frozen)[0]
    # channels that occur equally often in every member (a Flatten block or a grouped conv repeats them alike)
    pairs = [(int(a), int(b)) for a in free for b in free if a != b
             and all((m.channels == a).sum() == (m.channels == b).sum() for m in group.members)]
    assume(pairs)
    source, copy = pairs[int(rng.integers(len(pairs)))]
    duplicated = duplicate_model(prepared, group, source, copy)
    merged, report = onnx_prune.prune(duplicated, method="red", merge_tol=0, hash_weights=False)
    assert report.channels_after <= report.channels_before - 1
    assert _checked(merged, duplicated, _feeds(model, seed)) < 1e-4
