"""What every channel rule uses: a node's attributes, axes made non-negative, how a node is named in reasons,
and `block`, the rule for whatever no rule understands (it freezes every channel that reaches the node)."""
from __future__ import annotations

import onnx
from onnx import helper

from onnx_prune.analysis.channels import Context


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name}'"


def is_static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


# --- the default: anything not understood freezes the channels that reach it

def block(ctx: Context, node: onnx.NodeProto, why: str = "") -> None:
    reason = f"{describe(node)} {why or 'is not understood by any channel rule'}"
    for name in node.input:
        if name:
            ctx.freeze_tensor(name, reason)
