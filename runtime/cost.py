"""MACs and parameter counts read from the graph, without running it.

MACs are counted for Conv, ConvTranspose, Gemm and MatMul (bias additions are not
MACs); every other op counts 0. Only the main graph's nodes are counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_prune.analysis.layers import weight_axes

from .sessions import input_specs, resolve_input_shapes
from .shapes import measure_shapes, static_shapes

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(frozen=True)
class NodeCost:
    op_type: str
    macs: int
    params: int  # elements of the float weights this node reads (shared weights count at each reader)


@dataclass
class Cost:
    macs: int
    params: int  # elements of the float initializers / Constant tensors read by any node, each once
    per_node: dict[str, NodeCost]  # node name (or "<op_type>_<index>" when unnamed) -> cost
    unknown: dict[str, str] = field(default_factory=dict)  # node -> why its MACs are unknown (partial counts)

    def unknown_lines(self) -> list[str]:
        """One line per node whose MACs could not be counted (they count 0 in `macs`)."""
        return [f"MACs unknown for node {name!r}: {why}" for name, why in self.unknown.items()]

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


def concrete_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, batch: int = 1
) -> dict[str, tuple[int | str | None, ...]]:
    """Shape of every tensor static inference can determine, with dynamic input dims fixed (the concrete sizes
    MACs need; `runtime.shapes.infer_shapes` keeps symbolic dims, for the analysis).

    A dynamic leading input dim becomes `batch`; other dynamic dims come from
    `input_shapes` (input name -> full shape); a missing one raises ValueError naming it.
    Shape computations (computed Reshape targets, Slice bounds, TF-"SAME" pads) are folded
    with numpy on the way; the model is not run.
    """
    fixed = resolve_input_shapes(input_specs(model), input_shapes, batch)
    shapes, _ = static_shapes(model, fixed)
    return {name: tuple(dims) for name, dims in shapes.items() if dims is not None}


def _measured_shapes(model: onnx.ModelProto, shapes: dict, input_shapes, batch: int) -> dict:
    """Shapes static inference could not find, measured by one bounded onnxruntime run (opt-in)."""
    needed = sorted({name for node in model.graph.node if node.op_type in _MAC_RULES
                     for name in list(node.input[:2]) + [node.output[0]]
                     if name and not all(isinstance(d, int) for d in shapes.get(name) or [None])})
    if not needed:
        return {}
    from .fidelity import make_inputs

    return measure_shapes(model, needed, make_inputs(model, shapes=input_shapes, samples=1, batch=batch)[0])


def _float_weight_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element count of each float tensor stored in the graph (initializers and Constant nodes)."""
    sizes = {
        tensor.name: math.prod(tensor.dims) for tensor in graph.initializer if tensor.data_type in _FLOAT_TYPES
    }
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type in _FLOAT_TYPES:
                sizes[node.output[0]] = math.prod(attribute.t.dims)
            elif attribute.name == "value_float":
                sizes[node.output[0]] = 1
            elif attribute.name == "value_floats":
                sizes[node.output[0]] = len(attribute.floats)
    return sizes


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, subgraphs (If/Loop/Scan bodies) included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                names |= _consumed_names(subgraph)
    return names


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == name), default)


def _conv_macs(node, shape_of) -> int:
    # Each output element is a dot product over W's [Cin/group, k...] slice.
    return math.prod(shape_of(node.output[0])) * math.prod(shape_of(node.input[1])[1:])


def _conv_transpose_macs(node, shape_of) -> int:
    # Each input element scatters into W's [Cout/group, k...] slice.
    return math.prod(shape_of(node.input[0])) * math.prod(shape_of(node.input[1])[1:])


def _gemm_macs(node, shape_of) -> int:
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    m, k = (a[1], a[0]) if _int_attribute(node, "transA", 0) else (a[0], a[1])
    n = b[weight_axes(node, 2)[0]]
    return m * k * n


def _matmul_macs(node, shape_of) -> int:
    a, b = list(shape_of(node.input[0])), list(shape_of(node.input[1]))
    # numpy semantics: a 1-D operand is a row vector on the left, a column vector on the right.
    a = [1, *a] if len(a) == 1 else a
    b = [*b, 1] if len(b) == 1 else b
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


_MAC_RULES = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}


def _node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name per node: its own, else "<op_type>_<index>"; repeats get "_<index>"."""
    names: list[str] = []
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def _static_shape(shapes: dict, node_label: str, tensor: str) -> tuple[int, ...]:
    dims = shapes.get(tensor)
    if dims is None or not all(isinstance(size, int) for size in dims):
        raise ValueError(
            f"cannot count MACs of {node_label}: shape of {tensor!r} is "
            f"{'unknown' if dims is None else list(dims)} after shape inference; "
            "give the dynamic input dims with input_shapes"
        )
    return dims


def count_cost(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, batch: int = 1,
               *, partial: bool = False, measure: bool = False) -> Cost:
    """MACs and parameters of `model` at the given batch size, from the graph alone.

    Conv/ConvTranspose MACs = (output resp. input elements) * prod(W.shape[1:]) -- this
    covers grouped and depthwise convs; Gemm = M*K*N honouring transA/transB; MatMul =
    broadcast batch * M*K*N. Params = elements of float initializers and Constant tensors
    that some node reads. Dynamic dims: see `concrete_shapes`.  Shapes come from static inference
    with shape computations folded; `measure=True` also runs the model once for sizes still
    missing (bounded in memory, in a child process).  A shape still unknown raises ValueError,
    or with `partial=True` counts that node as 0 and names it in `Cost.unknown`.
    """
    try:
        shapes = concrete_shapes(model, input_shapes, batch)
    except ValueError:
        if not partial:
            raise
        shapes = {name: tuple(dims) for name, dims in static_shapes(model)[0].items() if dims is not None}
    if measure:
        shapes.update(_measured_shapes(model, shapes, input_shapes, batch))
    weight_sizes = _float_weight_sizes(model.graph)
    per_node: dict[str, NodeCost] = {}
    unknown: dict[str, str] = {}
    for name, node in zip(_node_names(model.graph), model.graph.node):
        shape_of = functools.partial(_static_shape, shapes, f"{node.op_type} node {name!r}")
        rule = _MAC_RULES.get(node.op_type)
        try:
            macs = rule(node, shape_of) if rule and node.domain in ("", "ai.onnx") else 0
        except ValueError as err:
            if not partial:
                raise
            macs, unknown[name] = 0, str(err).split(": ", 1)[-1]
        params = sum(weight_sizes.get(tensor, 0) for tensor in dict.fromkeys(node.input))
        per_node[name] = NodeCost(node.op_type, macs, params)
    consumed = _consumed_names(model.graph)
    params = sum(size for tensor, size in weight_sizes.items() if tensor in consumed)
    return Cost(sum(cost.macs for cost in per_node.values()), params, per_node, unknown)


def _ratio(before: int, after: int) -> dict:
    ratio = after / before if before else float("nan")
    return {"before": before, "after": after, "ratio": ratio, "reduction": 1.0 - ratio}


def cost_ratio(before: Cost, after: Cost) -> dict:
    """{"macs": {...}, "params": {...}}, each with before, after, ratio (after/before) and
    reduction (1 - ratio). The theoretical speed-up for `bench.compare_latency` is 1/ratio."""
    return {"macs": _ratio(before.macs, after.macs), "params": _ratio(before.params, after.params)}
