"""What the package reads off ONNX nodes, each in one place: an attribute's value, which axis of a layer's weight
indexes its output and its input channels, the nodes that read a tensor."""
from __future__ import annotations

import onnx
from onnx import helper


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute `name`, `default` where the node does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def weight_axes(node: onnx.NodeProto, ndim: int) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of the weight (input 1) of a Conv, ConvTranspose, Gemm or
    MatMul node whose weight has `ndim` dimensions."""
    if node.op_type == "Gemm":
        return (0, 1) if attr(node, "transB", 0) else (1, 0)
    if node.op_type == "MatMul":
        return ndim - 1, ndim - 2
    if node.op_type == "ConvTranspose":  # (C_in, C_out / group, k...)
        return 1, 0
    return 0, 1  # Conv: (C_out, C_in / group, k...)


def readers_of(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers
