"""Fold a BatchNormalization into the Conv or ConvTranspose it alone reads from (what onnxruntime does anyway).

Merging channels averages or sums their filters, which is exact for the linear layer but not for the BN's
running statistics after it; folding first makes the filters the whole story.

A BN is folded only where every check passes (the layer's output has no other reader and is no graph output,
weights and BN parameters are constants read by nobody else, inference mode, one output); otherwise it stays,
untouched and wired as it was, and ``details["kept"]`` says why.  Grouped ConvTranspose weights are
(C_in, C_out / group, k...): output channel g * C_out/group + j sits at column j of row block g.

Requires: a model (constant weights are checked per BN).  Ensures (checked): the same function on a seeded
input, graph outputs unchanged, onnx.checker passes, the input model not mutated.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.analysis.channels import subgraph_reads
from onnx_prune.analysis.layers import attr as _attribute
from onnx_prune.passes.base import Pass, PassResult, copy_model


def why_not_foldable(layer: onnx.NodeProto | None, bn: onnx.NodeProto, inits: dict, readers: dict[str, int],
                     outputs: set[str]) -> str | None:
    """None where `bn` can fold into `layer` (the node producing its input), else the reason in words."""
    if layer is None or layer.op_type not in ("Conv", "ConvTranspose"):
        return "its input is not produced by a Conv or ConvTranspose"
    if readers[bn.input[0]] != 1 or bn.input[0] in outputs:
        return "the layer's output has other readers"
    if len([o for o in bn.output if o]) > 1 or _attribute(bn, "training_mode", 0):
        return "training mode (running statistics as outputs)"
    params = list(bn.input[1:5]) + [n for n in layer.input[1:] if n]
    if len(layer.input) < 2 or not all(n in inits for n in params):
        return "weights or BN parameters are not constants"
    if any(readers[n] > 1 for n in params):
        return "a weight or BN parameter is shared with other nodes"  # folding would change the others too
    if inits[layer.input[1]].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                               onnx.TensorProto.FLOAT16):
        return "weights are not floating point"
    return None


class FoldBatchNormPass(Pass):
    """Details: ``folded`` (BN name -> layer name) and ``kept`` (BN name -> why it was not folded)."""

    preserves_function = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        model = copy_model(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        producer = {n.output[0]: n for n in graph.node if n.output}
        outputs = {o.name for o in graph.output}
        folded, kept = {}, {}
        for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
            layer = producer.get(bn.input[0])
            reason = why_not_foldable(layer, bn, inits, readers, outputs)
            if reason is not None:
                kept[bn.name] = reason
                continue
            _fold(layer, bn, inits, graph)
            layer.output[0] = bn.output[0]  # only now that the BN's work is in the layer's weights
            graph.node.remove(bn)
            folded[bn.name] = layer.name
        if folded:
            used = {name for node in graph.node for name in node.input}
            used |= set().union(*(subgraph_reads(node) for node in graph.node))  # outer-scope reads of If/Loop
            for tensor in [t for t in graph.initializer if t.name not in used]:
                graph.initializer.remove(tensor)
        return PassResult(model, bool(folded), {"folded": folded, "kept": kept})


def output_scale_shape(layer: onnx.NodeProto, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape that broadcasts a per-output-channel vector over the layer's weight, viewed as returned by
    `weight_view` (Conv: (C_out, C_in/g, k...); ConvTranspose: (group, C_in/g, C_out/g, k...))."""
    if layer.op_type == "Conv":
        return (-1,) + (1,) * (len(weight_shape) - 1)
    group = _attribute(layer, "group", 1)
    return (group, 1, weight_shape[1]) + (1,) * (len(weight_shape) - 2)


def weight_view(layer: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The weight reshaped so that `output_scale_shape` broadcasts per output channel."""
    if layer.op_type == "Conv":
        return weight
    group = _attribute(layer, "group", 1)
    return weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])


def _fold(layer: onnx.NodeProto, bn: onnx.NodeProto, inits: dict, graph: onnx.GraphProto) -> None:
    eps = _attribute(bn, "epsilon", 1e-5)
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    weight = numpy_helper.to_array(inits[layer.input[1]])
    view = weight_view(layer, weight.astype(np.float64))
    new_weight = (view * scale.reshape(output_scale_shape(layer, weight.shape))).reshape(weight.shape)
    has_bias = len(layer.input) > 2 and layer.input[2]
    bias = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64) if has_bias else 0.0
    new_bias = ((bias - mean) * scale + beta).astype(weight.dtype)
    inits[layer.input[1]].CopyFrom(numpy_helper.from_array(new_weight.astype(weight.dtype), layer.input[1]))
    if has_bias:
        inits[layer.input[2]].CopyFrom(numpy_helper.from_array(new_bias, layer.input[2]))
    else:
        name = f"{layer.name or layer.output[0]}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(new_bias, name))
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = name
