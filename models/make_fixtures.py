"""Build the tiny hand-made ONNX fixtures in models/fixtures/.

Each fixture exercises one channel-coupling pattern (see models/fixtures/README.md).
Deterministic: every fixture seeds its own RNG from its name, so running the script
twice produces byte-identical files.

    python models/make_fixtures.py [out_dir]
"""

from __future__ import annotations

import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
EXTERNAL_DATA = {"external_data": "external_data.onnx.data"}  # fixture -> data file


class Builder:
    """Accumulates nodes and parameters of one graph with deterministic names (conv0, bn0, ...)."""

    def __init__(self, name: str, const_params: bool = False):
        self.name = name
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.const_params = const_params  # parameters as Constant nodes instead of initializers
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: Counter[str] = Counter()

    def uid(self, prefix: str) -> str:
        self.counts[prefix] += 1
        return f"{prefix}{self.counts[prefix] - 1}"

    def randn(self, *shape: int, std: float = 0.3) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def tensor(self, name: str, value) -> str:
        t = numpy_helper.from_array(np.asarray(value), name)
        if self.const_params:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/const", value=t))
        else:
            self.inits.append(t)
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, name: str | None = None, **attrs):
        """Add a node; returns its output name (or list of names when several outputs)."""
        name = name or self.uid(op_type.lower())
        outs = outputs if isinstance(outputs, list) else [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # --- layers -----------------------------------------------------------------------
    def conv(self, x, cin, cout, k=3, stride=1, group=1, bias=True, weight=None):
        name = self.uid("conv")
        w = weight or self.tensor(f"{name}.weight", self.randn(cout, cin // group, k, k))
        inputs = [x, w] + ([self.tensor(f"{name}.bias", self.randn(cout))] if bias else [])
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=group)

    def bn(self, x, c):
        name = self.uid("bn")
        p = {
            "scale": self.rng.uniform(0.5, 1.5, c),
            "bias": self.rng.normal(0, 0.2, c),
            "mean": self.rng.normal(0, 0.2, c),
            "var": self.rng.uniform(0.5, 1.5, c),
        }
        inputs = [self.tensor(f"{name}.{k}", v.astype(np.float32)) for k, v in p.items()]
        return self.op("BatchNormalization", [x, *inputs], name=name)

    def relu(self, x):
        return self.op("Relu", [x])

    def conv_bn(self, x, cin, cout, **kw):
        return self.bn(self.conv(x, cin, cout, bias=False, **kw), cout)

    def conv_bn_relu(self, x, cin, cout, **kw):
        return self.relu(self.conv_bn(x, cin, cout, **kw))

    def head(self, x, c, n=10, out="logits"):
        """GlobalAveragePool -> Flatten -> Gemm(c -> n)."""
        y = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        w, b = self.tensor("fc.weight", self.randn(n, c)), self.tensor("fc.bias", self.randn(n))
        return self.op("Gemm", [y, w, b], [out], name="fc", transB=1)

    def ints(self, *values: int) -> str:
        """An int64 1-D constant (shapes, split sizes, slice bounds, pads)."""
        return self.tensor(self.uid("const"), np.array(values, np.int64))

    # --- model ------------------------------------------------------------------------
    def model(self, opset, inputs=None, outputs=None) -> onnx.ModelProto:
        inputs = inputs or [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])]
        outputs = outputs or [helper.make_tensor_value_info("logits", F32, ["N", 10])]
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        opsets = [helper.make_opsetid("", opset)]
        return helper.make_model(
            graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets), producer_name="onnx-prune-fixtures"
        )


# --- fixtures -------------------------------------------------------------------------
def residual_add() -> onnx.ModelProto:
    b = Builder("residual_add")
    s = b.conv_bn_relu("x", 3, 8)
    h = b.relu(b.op("Add", [b.conv_bn(b.conv_bn_relu(s, 8, 8), 8, 8), s]))
    main, short = b.conv_bn(h, 8, 16, stride=2), b.conv_bn(h, 8, 16, k=1, stride=2)
    b.head(b.relu(b.op("Add", [main, short])), 16)
    return b.model(13)


def concat() -> onnx.ModelProto:
    b = Builder("concat")
    s = b.relu(b.conv("x", 3, 8))
    y = b.op("Concat", [b.relu(b.conv(s, 8, 4, k=1)), b.relu(b.conv(s, 8, 6))], axis=1)
    b.head(b.conv(y, 10, 8, k=1), 8)
    return b.model(17)


def se() -> onnx.ModelProto:
    b = Builder("se")
    h = b.conv_bn_relu("x", 3, 16)
    g = b.relu(b.conv(b.op("GlobalAveragePool", [h]), 16, 4, k=1))
    g = b.op("Sigmoid", [b.conv(g, 4, 16, k=1)])
    b.head(b.conv(b.op("Mul", [h, g]), 16, 8, k=1), 8)
    return b.model(17)


def depthwise() -> onnx.ModelProto:
    b = Builder("depthwise")
    lo, hi = b.tensor("clip.min", np.float32(0)), b.tensor("clip.max", np.float32(6))

    def clip6(x):  # ReLU6, opset-11 Clip with min/max as inputs
        return b.op("Clip", [x, lo, hi])

    s = clip6(b.conv_bn("x", 3, 8, k=1))
    h = clip6(b.conv_bn(s, 8, 16, k=1))  # expand
    h = clip6(b.conv_bn(h, 16, 16, group=16))  # depthwise
    h = b.op("Add", [b.conv_bn(h, 16, 8, k=1), s])  # project + residual
    h = b.conv(h, 8, 16, group=8)  # depthwise, channel multiplier 2
    b.head(b.conv(h, 16, 8, k=1), 8)
    return b.model(11)


def flatten_gemm() -> onnx.ModelProto:
    b = Builder("flatten_gemm")
    h = b.op("MaxPool", [b.relu(b.conv("x", 3, 4))], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [h], axis=1)
    b.op("Gemm", [y, b.tensor("fc.weight", b.randn(10, 64)), b.tensor("fc.bias", b.randn(10))], ["logits"], name="fc", transB=1)
    return b.model(17)


def reshape_gemm() -> onnx.ModelProto:
    b = Builder("reshape_gemm")
    h = b.op("MaxPool", [b.relu(b.conv("x", 3, 4))], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MatMul", [b.op("Reshape", [h, b.ints(-1, 64)]), b.tensor("fc.weight", b.randn(64, 10))])
    b.op("Add", [y, b.tensor("fc.bias", b.randn(10))], ["logits"])
    return b.model(17)


def channel_shuffle() -> onnx.ModelProto:
    b = Builder("channel_shuffle")

    def unit(left, right):  # ShuffleNetV2 unit: identity half + conv branch, concat, shuffle(groups=2)
        r = b.conv_bn_relu(right, 4, 4, k=1)
        r = b.conv_bn_relu(b.conv_bn(r, 4, 4, group=4), 4, 4, k=1)
        h = b.op("Reshape", [b.op("Concat", [left, r], axis=1), b.ints(0, 2, 4, 8, 8)])
        return b.op("Reshape", [b.op("Transpose", [h], perm=[0, 2, 1, 3, 4]), b.ints(0, 8, 8, 8)])

    h = unit(*b.op("Split", [b.conv("x", 3, 8), b.ints(4, 4)], outputs=2, axis=1))
    halves = [b.op("Slice", [h, b.ints(lo), b.ints(hi), b.ints(1)]) for lo, hi in ((0, 4), (4, 8))]
    b.head(unit(*halves), 8)
    return b.model(17)


def unknown_op() -> onnx.ModelProto:
    b = Builder("unknown_op")
    h = b.conv(b.relu(b.conv("x", 3, 8)), 8, 8)  # prunable Conv-Relu-Conv chain
    h = b.op("LRN", [b.relu(h)], size=3)  # cross-channel op the tool does not model
    b.head(b.conv(h, 8, 8), 8)
    return b.model(17)


def nhwc_transpose() -> onnx.ModelProto:
    b = Builder("nhwc_transpose")
    to_nchw, to_nhwc = [0, 3, 1, 2], [0, 2, 3, 1]
    h = b.op("Transpose", [b.conv(b.op("Transpose", ["x"], perm=to_nchw), 3, 8, bias=False)], perm=to_nhwc)
    h = b.relu(b.op("Add", [h, b.tensor("bias0", b.randn(8))]))
    h = b.op("Transpose", [b.conv(b.op("Transpose", [h], perm=to_nchw), 8, 8, bias=False)], perm=to_nhwc)
    h = b.op("ReduceMean", [h], axes=[1, 2], keepdims=0)
    b.op("MatMul", [h, b.tensor("fc.weight", b.randn(8, 10))], ["logits"])
    return b.model(17, inputs=[helper.make_tensor_value_info("x", F32, ["N", 8, 8, 3])])


def constant_weights() -> onnx.ModelProto:
    b = Builder("constant_weights", const_params=True)
    b.head(b.conv_bn_relu(b.conv_bn_relu("x", 3, 8), 8, 16), 16)
    return b.model(17)


def pad_channel() -> onnx.ModelProto:
    b = Builder("pad_channel")
    s = b.conv("x", 3, 8)
    main = b.conv(s, 8, 16, stride=2)
    short = b.op("Slice", [s, b.ints(0, 0), b.ints(8, 8), b.ints(2, 3), b.ints(2, 2)])  # x[:, :, ::2, ::2]
    short = b.op("Pad", [short, b.ints(0, 4, 0, 0, 0, 4, 0, 0)])  # zero channels 8 -> 16 (4 before, 4 after)
    b.head(b.relu(b.op("Add", [main, short])), 16)
    return b.model(13)


def if_subgraph() -> onnx.ModelProto:
    b = Builder("if_subgraph")
    h = b.relu(b.conv("x", 3, 8))
    branches = {}
    for branch, op_type in (("then", "Relu"), ("else", "Sigmoid")):
        out = helper.make_tensor_value_info(f"{branch}_out", F32, ["N", 8, 8, 8])
        node = helper.make_node(op_type, [h], [out.name], name=f"{branch}/{op_type.lower()}")
        branches[f"{branch}_branch"] = helper.make_graph([node], f"{branch}_branch", [], [out])
    h = b.op("If", ["flag"], **branches)
    b.head(b.conv(h, 8, 8), 8)
    flag = helper.make_tensor_value_info("flag", BOOL, [])
    return b.model(16, inputs=[helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8]), flag])


def loop_subgraph() -> onnx.ModelProto:
    b = Builder("loop_subgraph")
    h = b.relu(b.conv("x", 3, 8))
    bias = b.tensor("loop.bias", b.randn(1, 8, 1, 1))  # per-channel constant read from the outer scope
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/identity"),
            helper.make_node("Add", ["v_in", bias], ["v_out"], name="body/add"),
        ],
        "loop_body",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in (("i", I64, []), ("cond_in", BOOL, []), ("v_in", F32, None))],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in (("cond_out", BOOL, []), ("v_out", F32, None))],
    )
    trip, cond = b.tensor("loop.trip_count", np.int64(2)), b.tensor("loop.cond", np.bool_(True))
    h = b.op("Loop", [trip, cond, h], body=body)
    b.head(b.conv(h, 8, 8), 8)
    return b.model(17)


def grouped_conv() -> onnx.ModelProto:
    b = Builder("grouped_conv")
    h = b.conv_bn_relu(b.conv("x", 3, 8), 8, 8, group=2)
    b.head(b.conv(h, 8, 8, k=1), 8)
    return b.model(17)


def shared_weight() -> onnx.ModelProto:
    b = Builder("shared_weight")
    s = b.conv("x", 3, 8)
    w = b.tensor("shared.weight", b.randn(8, 8, 3, 3))
    h = b.op("Add", [b.conv(s, 8, 8, bias=False, weight=w), b.conv(b.relu(s), 8, 8, bias=False, weight=w)])
    b.head(b.conv(h, 8, 8), 8)
    return b.model(17)


def resize_scales() -> onnx.ModelProto:
    b = Builder("resize_scales")
    scales = b.tensor("resize.scales", np.array([1, 1, 2, 2], np.float32))
    h = b.op("Resize", [b.relu(b.conv("x", 3, 8)), "", scales], mode="nearest")
    b.head(b.conv(h, 8, 8), 8)
    return b.model(19)


def resize_sizes() -> onnx.ModelProto:
    b = Builder("resize_sizes")
    h = b.op("Resize", [b.relu(b.conv("x", 3, 8)), "", "", b.ints(1, 8, 16, 16)], mode="linear")
    b.head(b.conv(h, 8, 8), 8)
    io = helper.make_tensor_value_info
    return b.model(19, inputs=[io("x", F32, [1, 3, 8, 8])], outputs=[io("logits", F32, [1, 10])])


def opset21() -> onnx.ModelProto:
    b = Builder("opset21")
    b.head(b.conv(b.conv_bn_relu("x", 3, 8), 8, 16), 16)
    return b.model(21)


def blazeface_block() -> onnx.ModelProto:
    """tflite2onnx BlazeFace pattern: depthwise conv with bias -> 1x1 conv, shortcut MaxPool (stride 2) and a
    Pad that adds zero channels, residual Add, PRelu."""
    b = Builder("blazeface_block")

    def prelu(x, c):
        return b.op("PRelu", [x, b.tensor(b.uid("slope"), b.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32))])

    def blaze(x, cin, cout, stride):
        h = b.conv(b.conv(x, cin, cin, stride=stride, group=cin), cin, cout, k=1)
        if stride == 2:
            x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        if cout > cin:
            x = b.op("Pad", [x, b.ints(0, 0, 0, 0, 0, cout - cin, 0, 0)])
        return prelu(b.op("Add", [h, x]), cout)

    h = prelu(b.conv("x", 3, 4), 4)
    h = blaze(blaze(blaze(h, 4, 4, 1), 4, 24, 2), 24, 24, 1)
    b.head(prelu(b.conv(h, 24, 16, k=1), 16), 16)
    return b.model(13)


def paddle_se() -> onnx.ModelProto:
    """paddle2onnx pattern: dynamic H/W declared as -1, Constant-node weights, an SE block gated by HardSigmoid."""
    b = Builder("paddle_se", const_params=True)
    h = b.relu(b.conv_bn("x", 3, 16))
    g = b.relu(b.conv(b.op("GlobalAveragePool", [h]), 16, 4, k=1))
    h = b.op("Mul", [h, b.op("HardSigmoid", [b.conv(g, 4, 16, k=1)], alpha=0.2, beta=0.5)])
    b.head(b.relu(b.conv_bn(h, 16, 8)), 8)
    io = helper.make_tensor_value_info
    return b.model(11, inputs=[io("x", F32, [-1, 3, -1, -1])], outputs=[io("logits", F32, [-1, 10])])


def tf_same_padding() -> onnx.ModelProto:
    """EfficientNet-Lite / TF "SAME" convs as TorchScript exports them: the pads are computed at run time from
    Shape (pad = max((ceil(i / s) - 1) * s + k - i, 0), split before/after), then reordered from torch's
    last-dim-first list to ONNX's (zeros from ConstantOfShape, Reshape [-1, 2], reversed Slice, Transpose,
    Reshape [-1]) before a Pad and an unpadded strided Conv."""
    b = Builder("tf_same_padding")

    def scalar(value):
        return b.tensor(b.uid("const"), np.array(value, np.int64))

    def same_pad(x, k, s, static=False):
        if static:  # Conv2dStaticSamePadding: the amounts are constants, reordered at run time all the same
            listed = b.ints(0, 1, 0, 1)
        else:
            shape = b.op("Shape", [x])
            amounts = []
            for axis in (3, 2):  # torch lists the last dim first
                size = b.op("Gather", [shape, scalar(axis)], axis=0)
                out = b.op("Div", [b.op("Add", [size, scalar(s - 1)]), scalar(s)])  # ceil(size / s)
                total = b.op("Sub", [b.op("Add", [b.op("Mul", [b.op("Sub", [out, scalar(1)]), scalar(s)]),
                                                  scalar(k)]), size])
                total = b.op("Max", [total, scalar(0)])
                first = b.op("Div", [total, scalar(2)])
                amounts += [first, b.op("Sub", [total, first])]
            listed = b.op("Concat", [b.op("Unsqueeze", [a, b.ints(0)]) for a in amounts], axis=0)
        missing = b.op("Sub", [scalar(8), b.op("Gather", [b.op("Shape", [listed]), scalar(0)], axis=0)])
        zeros = b.op("ConstantOfShape", [b.op("Unsqueeze", [missing, b.ints(0)])],
                     value=numpy_helper.from_array(np.zeros(1, np.int64)))
        pairs = b.op("Reshape", [b.op("Concat", [listed, zeros], axis=0), b.ints(-1, 2)])
        pairs = b.op("Slice", [pairs, b.ints(-1), b.ints(-(2**63) + 1), b.ints(0), b.ints(-1)])
        pads = b.op("Reshape", [b.op("Transpose", [pairs], perm=[1, 0]), b.ints(-1)])
        return b.op("Pad", [x, pads], mode="constant")

    def same_conv(x, cin, cout, k, s, group=1, static=False):
        name = b.uid("conv")
        w = b.tensor(f"{name}.weight", b.randn(cout, cin // group, k, k))
        bias = b.tensor(f"{name}.bias", b.randn(cout))
        return b.op("Conv", [same_pad(x, k, s, static), w, bias], name=name, kernel_shape=[k, k], strides=[s, s],
                    group=group)

    h = b.relu(same_conv("x", 3, 8, 3, 2))
    h = b.relu(same_conv(h, 8, 8, 3, 2, group=8, static=True))  # depthwise, constant amounts
    h = b.op("GlobalAveragePool", [b.relu(same_conv(h, 8, 16, 1, 1))])
    # x.view(x.size(0), -1): the -1 is an Unsqueeze of a constant, computed at run time
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", ["x"]), scalar(0)], axis=0), b.ints(0)])
    flat = b.op("Reshape", [h, b.op("Concat", [batch, b.op("Unsqueeze", [scalar(-1), b.ints(0)])], axis=0)])
    w, bias = b.tensor("fc.weight", b.randn(10, 16)), b.tensor("fc.bias", b.randn(10))
    b.op("Gemm", [flat, w, bias], ["logits"], name="fc", transB=1)
    return b.model(13)


FIXTURES: dict[str, Callable[[], onnx.ModelProto]] = {
    "residual_add": residual_add,
    "concat": concat,
    "se": se,
    "depthwise": depthwise,
    "flatten_gemm": flatten_gemm,
    "reshape_gemm": reshape_gemm,
    "channel_shuffle": channel_shuffle,
    "unknown_op": unknown_op,
    "nhwc_transpose": nhwc_transpose,
    "constant_weights": constant_weights,
    "pad_channel": pad_channel,
    "if_subgraph": if_subgraph,
    "loop_subgraph": loop_subgraph,
    "grouped_conv": grouped_conv,
    "shared_weight": shared_weight,
    "resize_scales": resize_scales,
    "resize_sizes": resize_sizes,
    "external_data": residual_add,  # same model, saved with its tensors in external_data.onnx.data
    "opset21": opset21,
    "blazeface_block": blazeface_block,
    "paddle_se": paddle_se,
    "tf_same_padding": tf_same_padding,
}


def verify(path: Path) -> dict[str, tuple[int, ...]]:
    """Full-check the saved model and run it on CPU; returns output name -> shape."""
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        i.name: np.array(True)
        if i.type == "tensor(bool)"
        else rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
        for i in sess.get_inputs()
    }
    outs = sess.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outs), f"{path.name}: non-finite output"
    return {o.name: v.shape for o, v in zip(sess.get_outputs(), outs)}


def build_all(out_dir: str | Path) -> list[Path]:
    """Write every fixture to out_dir/<name>.onnx (plus external data files) and verify each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in FIXTURES.items():
        model, path = build(), out_dir / f"{name}.onnx"
        if name in EXTERNAL_DATA:
            data = out_dir / EXTERNAL_DATA[name]
            data.unlink(missing_ok=True)  # onnx appends to an existing data file
            onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=0)
        else:
            onnx.save(model, path)
        shapes = verify(path)
        print(f"{name:18s} opset {model.opset_import[0].version:2d}  {len(model.graph.node):3d} nodes  {shapes}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    build_all(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "fixtures")
