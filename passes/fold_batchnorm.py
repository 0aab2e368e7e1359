"""Fold a BatchNormalization into the Conv or ConvTranspose it alone reads from (what onnxruntime does anyway).

Merging channels averages or sums their filters, which is exact for the linear layer but not for the BN's
running statistics after it; folding first makes the filters the whole story.
Requires: constant weights and BN parameters.  Ensures: the same function (to float rounding), graph outputs
unchanged, the input model not mutated.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_prune.analysis.channels import subgraph_reads
from onnx_prune.passes.base import PassResult, copy_model


class FoldBatchNormPass:
    def __call__(self, model: onnx.ModelProto) -> PassResult:
        model = copy_model(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        producer = {n.output[0]: n for n in graph.node if n.output}
        outputs = {o.name for o in graph.output}
        folded = []
        for bn in graph.node:
            layer = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
            if layer is None or layer.op_type not in ("Conv", "ConvTranspose") or readers[bn.input[0]] != 1 \
                    or bn.input[0] in outputs or len([o for o in bn.output if o]) > 1 \
                    or not all(n in inits for n in list(bn.input[1:5]) + list(layer.input[1:])):
                continue
            if any(readers[n] > 1 for n in list(layer.input[1:]) + list(bn.input[1:5])):
                continue  # a shared weight would change for its other readers too
            _fold(layer, bn, inits, graph)
            layer.output[0] = bn.output[0]
            folded.append(bn)
        for bn in folded:
            graph.node.remove(bn)
        used = {name for node in graph.node for name in node.input}
        used |= set().union(*(subgraph_reads(node) for node in graph.node))  # outer-scope reads of If/Loop
        for tensor in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(tensor)
        return PassResult(model, bool(folded))


def _fold(layer: onnx.NodeProto, bn: onnx.NodeProto, inits: dict, graph: onnx.GraphProto) -> None:
    eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    weight = numpy_helper.to_array(inits[layer.input[1]])
    out_axis = 0 if layer.op_type == "Conv" else 1  # ConvTranspose weights are (C_in, C_out/group, ...)
    if layer.op_type == "ConvTranspose" and next((helper.get_attribute_value(a) for a in layer.attribute
                                                  if a.name == "group"), 1) != 1:
        return
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    new_weight = (weight * scale.reshape(shape)).astype(weight.dtype)
    bias = numpy_helper.to_array(inits[layer.input[2]]) if len(layer.input) > 2 and layer.input[2] else 0.0
    new_bias = ((bias - mean) * scale + beta).astype(weight.dtype)
    inits[layer.input[1]].CopyFrom(numpy_helper.from_array(new_weight, layer.input[1]))
    if len(layer.input) > 2 and layer.input[2]:
        inits[layer.input[2]].CopyFrom(numpy_helper.from_array(new_bias, layer.input[2]))
    else:
        name = f"{layer.name}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(new_bias, name))
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = name
