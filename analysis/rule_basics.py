"""What every channel rule uses besides `layers.attr`: axes made non-negative, how a node is named in reasons,
and `block`, the rule for whatever no rule understands (it freezes every channel that reaches the node)."""
from __future__ import annotations

import numpy as np
import onnx

from onnx_prune.analysis.channels import Context
from onnx_prune.analysis.layers import attr


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_of(ctx: Context, node: onnx.NodeProto) -> tuple[list | np.ndarray | None, bool]:
    """A node's `axes`: the attribute (older opsets) or the constant input 1 (newer ones), None where neither is
    given; and whether they are known (False where input 1 is computed)."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        return axes, axes is not None
    return axes, True


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
