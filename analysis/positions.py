"""Channel positions pushed through ops that only move data (Flatten, Reshape, Squeeze, Unsqueeze) with numpy.

A tensor holding, at every element, the position of its channel along the channel axis goes through the op;
where the positions land says how channels map onto the output (a block per channel after Flatten, an
interleaving after a channel shuffle), with no pattern matching.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnx_prune.analysis.channels import Context
from onnx_prune.analysis.layers import attr
from onnx_prune.analysis.rule_basics import axes_of, norm_axis
from onnx_prune.analysis.shape_values import shapevec


def push_positions(ctx: Context, node: onnx.NodeProto, shape: list[int], axis: int) -> np.ndarray | None:
    """Each element's position along `axis` in a tensor of `shape`, as `node` (a Flatten, Reshape, Squeeze or
    Unsqueeze) rearranges it; None where the op's target cannot be read."""
    size = shape[axis]
    index_shape = [1] * len(shape)
    index_shape[axis] = size
    positions = np.broadcast_to(np.arange(size).reshape(index_shape), shape)
    return _moved(ctx, node, positions)


def _moved(ctx: Context, node: onnx.NodeProto, positions: np.ndarray) -> np.ndarray | None:
    op = node.op_type
    if op == "Flatten":
        axis = norm_axis(attr(node, "axis", 1), positions.ndim)
        return positions.reshape(int(np.prod(positions.shape[:axis])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes, known = axes_of(ctx, node)
        if not known:
            return None
        if op == "Squeeze":
            axes = tuple(norm_axis(int(a), positions.ndim) for a in axes) if axes is not None else None
            return np.squeeze(positions, axis=axes)
        out_rank = positions.ndim + len(axes)
        return np.expand_dims(positions, tuple(sorted(norm_axis(int(a), out_rank) for a in axes)))
    target = shapevec(ctx, node, 1)
    if target is None or any(e.value is None for e in target):
        return None
    dims = [e.value for e in target]
    if not attr(node, "allowzero", 0):
        dims = [positions.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    try:
        return positions.reshape(dims)
    except ValueError:  # a batch we set to 1 does not fit the target: give up rather than guess
        return None


def channel_axis(positions: np.ndarray) -> tuple[int, list[np.ndarray]] | None:
    """The axis along which channel positions can be removed, and the positions at each of its indices.

    Either the positions vary along one axis only (a channel may repeat along it: Flatten's block map), or
    every index of an axis holds a set of positions that no other index holds (a channel shuffle's
    intermediate tensor): then removing an index removes the whole set.  The longest such axis wins.
    """
    single, partition = None, None
    for axis in range(positions.ndim):
        rows = np.moveaxis(positions, axis, 0).reshape(positions.shape[axis], -1)
        if (rows == rows[:, :1]).all():
            if single is None or rows.shape[0] > len(single[1]):
                single = (axis, [r[:1] for r in rows])
            continue
        uniques = [np.unique(r) for r in rows]
        flat = np.concatenate(uniques)
        if len(flat) == len(np.unique(flat)) and (partition is None or len(uniques) > len(partition[1])):
            partition = (axis, uniques)
    return single or partition

