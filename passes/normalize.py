"""Normalise how converters store weights so that analysis sees one form.

- `Constant` nodes holding tensors become initializers (Paddle and some TF converters emit them).
- `Identity` of an initializer is bypassed (the dynamo exporter and others emit them for tied weights).
- A tensor read by several nodes whose elements are all equal (exporters deduplicate zero biases) gets one
  copy per reader: it carries no channel identity, and sharing it would tie unrelated layers together.
- Dims declared as -1 (PaddlePaddle's dynamic dims) become symbols.
- Every node gets a unique name, because plans and reports refer to nodes by name; names the user gave stay.

Requires: a model that passed onnx.checker.  Ensures: the same function, graph outputs unchanged.
"""
from __future__ import annotations

from onnx import helper, numpy_helper
import numpy as np
import onnx

from onnx_prune.passes.base import Pass, PassResult, model_without_weights

_SCALAR_ATTRS = {
    "value_float": np.float32, "value_int": np.int64,
    "value_floats": np.float32, "value_ints": np.int64,
}


def _constant_tensor(node: onnx.NodeProto, name: str) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = name
            return tensor
        if attr.name in _SCALAR_ATTRS:
            value = helper.get_attribute_value(attr)
            return numpy_helper.from_array(np.asarray(value, dtype=_SCALAR_ATTRS[attr.name]), name)
    return None  # sparse or string constants stay as nodes


class NormalizeWeightsPass(Pass):
    """Constants to initializers, Identity-of-weight bypassed, unique node names.  Its ensures (Pass) check
    onnx.checker, output shapes and the input left alone; the function is not re-run on every prepare (it would
    run any model twice through onnxruntime), tests/test_passes.py checks it on the fixtures.

    The work happens on a copy of the graph without its weights; the weights are copied only when something
    changed, and a model that needs nothing is returned as it is (unmodified): a prepared model then holds no
    second copy of the user's weights."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        out = model_without_weights(model)
        graph = out.graph
        outputs = {o.name for o in graph.output}
        tensors = {t.name: t for t in model.graph.initializer}  # read only; new tensors go to `added`
        added: list[onnx.TensorProto] = []
        rename: dict[str, str] = {}
        kept = []
        modified = False
        for node in graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
                tensor = _constant_tensor(node, node.output[0])
                if tensor is not None:
                    added.append(tensor)
                    tensors[tensor.name] = tensor
                    modified = True
                    continue
            if (node.op_type == "Identity" and node.input[0] in tensors
                    and node.output[0] not in outputs):
                rename[node.output[0]] = node.input[0]
                modified = True
                continue
            kept.append(node)
        if modified:
            del graph.node[:]
            graph.node.extend(kept)
            _rename_in_subgraphs(graph, rename)
        modified |= _unshare_uniform_tensors(graph, tensors, added)
        modified |= _negative_dims_to_symbols(graph)
        modified |= _name_nodes(graph)
        if not modified:
            return PassResult(model, False)
        graph.initializer.extend(model.graph.initializer)
        graph.initializer.extend(added)
        return PassResult(out, True)


def _rename_in_subgraphs(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    if not rename:
        return
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                for inner in sub.node:
                    for i, name in enumerate(inner.input):
                        inner.input[i] = rename.get(name, name)
                _rename_in_subgraphs(sub, rename)


def _negative_dims_to_symbols(graph: onnx.GraphProto) -> bool:
    """Some converters (PaddlePaddle's) declare a dynamic dim as -1; ONNX dims are >= 0 or symbolic.  Each
    such dim becomes a symbol of its own, so nothing downstream mistakes -1 for a size."""
    changed = False
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.dim_param = f"{value.name}_dim{axis}"
                    changed = True
    return changed


def _unshare_uniform_tensors(graph: onnx.GraphProto, tensors: dict[str, onnx.TensorProto],
                             added: list[onnx.TensorProto]) -> bool:
    """Give each reader of a shared all-equal tensor (`tensors` by name) a copy of its own, appended to `added`."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in tensors:
                readers.setdefault(name, []).append((node, i))
    changed = False
    for name, uses in readers.items():
        if len(uses) < 2 or len(tensors[name].dims) == 0:
            continue
        value = numpy_helper.to_array(tensors[name])
        if value.size < 2 or not (value == value.reshape(-1)[0]).all():
            continue
        for k, (node, i) in enumerate(uses[1:], start=1):
            copy_name = f"{name}__{k}"
            added.append(numpy_helper.from_array(value, copy_name))
            node.input[i] = copy_name
        changed = True
    return changed


def _name_nodes(graph: onnx.GraphProto) -> bool:
    """Give unnamed nodes (and repeats of a name) a deterministic unique name.  A name the user gave is never
    changed: `--exclude Conv_0` must protect the node the user called Conv_0, so generated names avoid every
    explicit one.  Of several nodes sharing one name, the first keeps it."""
    taken = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        seen.add(name)
        changed = True
    return changed
