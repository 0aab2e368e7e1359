"""How each ONNX op touches channels: one rule per op, collected in `RULES`.

A rule reads the `Layout`s of a node's inputs from the `Context` and writes its outputs' layouts; it ties
channels that must go together, records weight slices (`ctx.member`) and shape integers (`ctx.shape_edit`)
that follow channels, and freezes what it cannot follow.  An op missing from the table is never guessed at:
`block` freezes every channel that reaches it.  Adding an op is adding one entry.

What the rules lean on lives apart: `shape_values` follows the integers a graph computes about its shapes,
`positions` pushes channel positions through reshapes with numpy, `rule_basics` and `layers` read nodes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from onnx_prune.analysis.channels import Context, subgraph_reads
from onnx_prune.analysis.layers import attr, weight_axes
from onnx_prune.analysis.positions import channel_axis, push_positions
from onnx_prune.analysis.rule_basics import axes_of, block, describe, is_static, norm_axis
from onnx_prune.analysis.shape_values import (
    fixed_input, fold_scenarios, has_shapevec_input, keeps_count, reshape_target_follows, shape_rule, shapevec,
    shapevec_arith, shapevec_gather, shapevec_passthrough, shapevec_slice, slice_bound, static_channel_dim)


def freeze_outer_scope_uses(ctx: Context, node: onnx.NodeProto) -> None:
    """Tensors an If/Loop/Scan body reads from the enclosing graph cannot change shape."""
    for name in sorted(subgraph_reads(node)):
        ctx.freeze_tensor(name, f"read inside a subgraph of {describe(node)}")


def apply_rule(ctx: Context, node: onnx.NodeProto) -> None:
    if node.domain not in ("", "ai.onnx"):
        block(ctx, node, f"is a custom op of domain '{node.domain}'")
        return
    fold_scenarios(ctx, node)
    RULES.get(node.op_type, block)(ctx, node)


# --- elementwise ops: unary pass-through and broadcasting binary ops that tie channels

def elementwise(ctx: Context, node: onnx.NodeProto) -> None:
    """Output channels = input channels; inputs meeting on the same axis are tied position by position."""
    if not any(ctx.layout(n) for n in node.input):
        if has_shapevec_input(ctx, node):
            (shapevec_passthrough if len(node.input) == 1 or node.op_type in ("Cast", "Identity")
             else shapevec_arith)(ctx, node)
        return
    out = node.output[0]
    ranks = [len(ctx.dims(n)) if n and ctx.dims(n) is not None else None for n in node.input]
    out_dims = ctx.dims(out)
    out_rank = len(out_dims) if out_dims is not None else max((r for r in ranks if r is not None), default=None)
    laid = [(i, n, ctx.layout(n)) for i, n in enumerate(node.input) if ctx.layout(n) is not None]
    if out_rank is None or any(ranks[i] is None for i, _, _ in laid):
        block(ctx, node, "has inputs of unknown rank")
        return
    axes = {lay.axis + out_rank - ranks[i] for i, _, lay in laid}
    if len(axes) > 1:
        block(ctx, node, "combines tensors whose channels lie on different axes")
        return
    axis = axes.pop()
    size = max(len(lay.ids) for _, _, lay in laid)
    ref = next(lay.ids for _, _, lay in laid if len(lay.ids) == size)
    for _, name, lay in laid:
        if len(lay.ids) == size:
            ctx.tie(ref, lay.ids)
        else:  # a single channel broadcast over all of them
            ctx.freeze(lay.ids, f"broadcast across channels by {describe(node)}")
    for i, name in enumerate(node.input):
        if not name or ctx.layout(name) is not None:
            continue
        dims = ctx.dims(name)
        if dims is None:
            ctx.freeze(ref, f"{describe(node)} combines channels with '{name}' of unknown shape")
            continue
        k = axis - (out_rank - len(dims))
        if k < 0 or dims[k] == 1:
            continue  # broadcast along the channel axis: nothing to slice
        if ctx.is_const(name) and dims[k] == size:
            ctx.member("carrier", node, i, k, ref)  # per-channel constant (bias, scale, PRelu slope)
        else:
            ctx.freeze(ref, f"{describe(node)} combines channels with '{name}', which no rule tracks")
    ctx.set_layout(out, axis, ref)


# --- producers and consumers

def conv(ctx: Context, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if not ctx.is_const(w) or (has_bias and not ctx.is_const(node.input[2])):
        block(ctx, node, "has weights that are not constant")
        return
    n_out, in_per_group = ctx.dims(w)[:2]
    group = attr(node, "group", 1)
    lay = ctx.layout(x)
    if lay is not None and lay.axis != 1:
        ctx.freeze(lay.ids, f"{describe(node)} reads channels on axis 1, not axis {lay.axis}")
        lay = None
    n_in = in_per_group * group

    def produce(ids):
        ctx.member("producer", node, 1, 0, ids)
        if has_bias:
            ctx.member("producer", node, 2, 0, ids)

    if group == 1:
        if lay is not None:
            ctx.member("consumer", node, 1, 1, lay.ids)
        out = ctx.fresh(n_out)
        produce(out)
    elif group == n_in and in_per_group == 1:  # depthwise: carries its input channels through
        mult = n_out // group
        if lay is None:
            out = ctx.fresh_frozen(n_out, f"{describe(node)} is depthwise over channels no rule tracks")
            produce(out)
        else:
            out = np.repeat(lay.ids, mult)
            ctx.member("carrier", node, 1, 0, out)
            if has_bias:
                ctx.member("carrier", node, 2, 0, out)
            ctx.shape_edit(("attr", node.name, "group", 0), lay.ids)
    else:  # grouped: the same in-group positions go in every group, so `group` stays
        if lay is not None:
            per_group = lay.ids.reshape(group, in_per_group)
            for g in range(1, group):
                ctx.tie(per_group[0], per_group[g])
            ctx.member("consumer", node, 1, 1, per_group[0])
        out_per_group = n_out // group
        out = np.tile(ctx.fresh(out_per_group), group)
        produce(out)
    ctx.set_layout(node.output[0], 1, out)


def conv_transpose(ctx: Context, node: onnx.NodeProto) -> None:
    w = node.input[1]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if attr(node, "group", 1) != 1 or not ctx.is_const(w) or (has_bias and not ctx.is_const(node.input[2])):
        block(ctx, node, "is grouped or has weights that are not constant")
        return
    lay = ctx.layout(node.input[0])
    if lay is not None:
        if lay.axis != 1:
            block(ctx, node, f"reads channels on axis 1, not axis {lay.axis}")
            return
        ctx.member("consumer", node, 1, 0, lay.ids)
    out = ctx.fresh(ctx.dims(w)[1])
    ctx.member("producer", node, 1, 1, out)
    if has_bias:
        ctx.member("producer", node, 2, 0, out)
    ctx.set_layout(node.output[0], 1, out)


def gemm(ctx: Context, node: onnx.NodeProto) -> None:
    a, b = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    if not ctx.is_const(b) or attr(node, "transA", 0) or (bias and not ctx.is_const(bias)):
        block(ctx, node, "has a weight that is not constant or a transposed input")
        return
    out_axis, in_axis = weight_axes(node, 2)
    lay = ctx.layout(a)
    if lay is not None:
        if lay.axis != 1:
            block(ctx, node, "reads channels on its batch axis")
            return
        ctx.member("consumer", node, 1, in_axis, lay.ids)
    n_out = ctx.dims(b)[out_axis]
    out = ctx.fresh(n_out)
    ctx.member("producer", node, 1, out_axis, out)
    if bias:
        bias_dims = ctx.dims(bias)
        if bias_dims and bias_dims[-1] == n_out and all(d == 1 for d in bias_dims[:-1]):
            ctx.member("producer", node, 2, len(bias_dims) - 1, out)
        elif bias_dims and bias_dims[-1] != 1:
            ctx.freeze(out, f"{describe(node)} has a bias of shape {bias_dims}")
    ctx.set_layout(node.output[0], 1, out)


def matmul(ctx: Context, node: onnx.NodeProto) -> None:
    a, b = node.input
    a_dims = ctx.dims(a)
    if not ctx.is_const(b) or len(ctx.dims(b)) != 2 or a_dims is None or len(a_dims) < 2:
        block(ctx, node, "multiplies tensors that are not (activation, 2-D constant weight)")
        return
    lay = ctx.layout(a)
    last = len(a_dims) - 1
    if lay is not None and lay.axis != last:  # channels on a row axis ride along unchanged
        ctx.set_layout(node.output[0], lay.axis, lay.ids)
        return
    if lay is not None:
        ctx.member("consumer", node, 1, 0, lay.ids)
    out = ctx.fresh(ctx.dims(b)[1])
    ctx.member("producer", node, 1, 1, out)
    ctx.set_layout(node.output[0], last, out)


# --- per-channel ops that keep channels on axis 1

def _nchw_passthrough(ctx: Context, node: onnx.NodeProto, carried_inputs: range = range(0)) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    if lay.axis != 1:
        block(ctx, node, f"works on axis 1 but the channels are on axis {lay.axis}")
        return
    for i in carried_inputs:
        if i < len(node.input) and node.input[i]:
            if not ctx.is_const(node.input[i]):
                block(ctx, node, f"has a per-channel input '{node.input[i]}' that is not constant")
                return
            ctx.member("carrier", node, i, 0, lay.ids)
    ctx.set_layout(node.output[0], 1, lay.ids)


def pool(ctx: Context, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        block(ctx, node, "returns indices that depend on the channel count")
        return
    _nchw_passthrough(ctx, node)


def batch_norm(ctx: Context, node: onnx.NodeProto) -> None:
    _nchw_passthrough(ctx, node, range(1, 5))


def instance_norm(ctx: Context, node: onnx.NodeProto) -> None:
    _nchw_passthrough(ctx, node, range(1, 3))


def _along_axis_ok(ctx: Context, node: onnx.NodeProto, mixes: Callable[[int, int], bool]) -> None:
    """Pass channels through unless the op mixes values along the channel axis (`mixes(axis, rank)`)."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    if not rank or mixes(lay.axis, rank):
        block(ctx, node, "mixes values across channels")
        return
    ctx.set_layout(node.output[0], lay.axis, lay.ids)


def softmax(ctx: Context, node: onnx.NodeProto) -> None:
    default = -1 if ctx.opset >= 13 else 1
    axis = attr(node, "axis", default)
    if ctx.opset >= 13:
        _along_axis_ok(ctx, node, lambda a, r: norm_axis(axis, r) == a)
    else:  # before opset 13 the input is coerced to 2-D at `axis`
        _along_axis_ok(ctx, node, lambda a, r: norm_axis(axis, r) <= a)


def layer_norm(ctx: Context, node: onnx.NodeProto) -> None:
    axis = attr(node, "axis", -1)
    _along_axis_ok(ctx, node, lambda a, r: a >= norm_axis(axis, r))


def lp_norm(ctx: Context, node: onnx.NodeProto) -> None:
    axis = attr(node, "axis", -1)
    _along_axis_ok(ctx, node, lambda a, r: norm_axis(axis, r) == a)


def reduce(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if has_shapevec_input(ctx, node):
            block(ctx, node, "reduces a shape")
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axes, known = axes_of(ctx, node)
    if not known:
        block(ctx, node, "reduces over axes that are not constant")
        return
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            ctx.set_layout(node.output[0], lay.axis, lay.ids)
        else:
            block(ctx, node, "reduces over every axis, channels included")
        return
    axes = [norm_axis(int(a), rank) for a in np.reshape(axes, -1)]
    if lay.axis in axes:
        block(ctx, node, "reduces over the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    ctx.set_layout(node.output[0], lay.axis if keep else lay.axis - sum(a < lay.axis for a in axes), lay.ids)


def arg_reduce(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axis = norm_axis(attr(node, "axis", 0), rank)
    if axis == lay.axis:
        block(ctx, node, "returns indices along the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    ctx.set_layout(node.output[0], lay.axis if keep or lay.axis < axis else lay.axis - 1, lay.ids)


# --- ops that cut and join along an axis

def concat(ctx: Context, node: onnx.NodeProto) -> None:
    laid = [ctx.layout(n) for n in node.input]
    if not any(laid):
        if has_shapevec_input(ctx, node):
            vecs = [shapevec(ctx, node, i) for i in range(len(node.input))]
            if any(v is None for v in vecs):
                block(ctx, node, "joins shape values that are not tracked")
                return
            ctx.shapevecs[node.output[0]] = [e for v in vecs for e in v]
        return
    rank = len(ctx.dims(node.output[0]) or ctx.dims(next(n for n, l in zip(node.input, laid) if l)) or [])
    axis = norm_axis(attr(node, "axis"), rank)
    lay_axes = {lay.axis for lay in laid if lay is not None}
    if len(lay_axes) > 1:
        block(ctx, node, "joins tensors whose channels lie on different axes")
        return
    lay_axis = lay_axes.pop()
    if axis != lay_axis:  # joining along another axis ties the channels like an elementwise op
        elementwise(ctx, node)
        return
    parts = []
    for name, lay in zip(node.input, laid):
        if lay is not None:
            parts.append(lay.ids)
            continue
        dims = ctx.dims(name)
        if dims is None or not isinstance(dims[axis], int):
            block(ctx, node, f"joins '{name}', whose channel count is unknown")
            return
        parts.append(ctx.fresh_frozen(dims[axis], f"{describe(node)} joins them with '{name}', which no rule tracks"))
    ctx.set_layout(node.output[0], axis, np.concatenate(parts))


def split(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if has_shapevec_input(ctx, node):
            block(ctx, node, "splits a shape")
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axis = norm_axis(attr(node, "axis", 0), rank)
    outputs = list(node.output)
    if axis != lay.axis:
        for out in outputs:
            ctx.set_layout(out, lay.axis, lay.ids)
        return
    size = len(lay.ids)
    if len(node.input) > 1 and node.input[1]:
        sizes = ctx.const(node.input[1])
        if sizes is None:
            block(ctx, node, "splits channels by sizes that are not constant")
            return
        sizes = [int(s) for s in sizes]
    elif attr(node, "split") is not None:
        sizes = list(attr(node, "split"))
    else:  # equal parts, the last one smaller if it must be (opset 18 num_outputs)
        n = len(outputs)
        chunk = -(-size // n)
        sizes = [min(chunk, size - k * chunk) for k in range(n)]
    bounds = np.cumsum([0] + sizes)
    for k, out in enumerate(outputs):
        part = lay.ids[bounds[k]:bounds[k + 1]]
        ctx.set_layout(out, axis, part)
        ctx.shape_edit(("split", node.name, k), part)


def _slice_params(ctx: Context, node: onnx.NodeProto):
    names = list(node.input[1:5]) + [""] * (5 - len(node.input))
    values = [ctx.const(n) if n else None for n in names]
    missing = [n for n, v in zip(names, values) if n and v is None]
    return values, missing


def slice_(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if node.input[0] in ctx.shapevecs:
            shapevec_slice(ctx, node)
        return
    (_, _, axes, steps), missing = _slice_params(ctx, node)
    starts, ends = shapevec(ctx, node, 1), shapevec(ctx, node, 2)
    rank = len(ctx.dims(node.input[0]) or [])
    if starts is None or ends is None or set(missing) - set(node.input[1:3]):
        block(ctx, node, "slices with bounds that are neither constant nor computed from the channel count")
        return
    axes = [norm_axis(int(a), rank) for a in (axes if axes is not None else range(len(starts)))]
    if lay.axis not in axes:
        ctx.set_layout(node.output[0], lay.axis, lay.ids)
        return
    k = axes.index(lay.axis)
    if steps is not None and int(steps[k]) != 1:
        block(ctx, node, "slices channels with a step other than 1")
        return
    bounds = [slice_bound(ctx, node, index, vector, k, lay.ids) for index, vector in ((1, starts), (2, ends))]
    if None in bounds:
        block(ctx, node, "slices channels at a bound computed in a way no rule follows")
        return
    ctx.set_layout(node.output[0], lay.axis, lay.ids[bounds[0]:bounds[1]])


def gather(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if node.input[0] in ctx.shapevecs:
            shapevec_gather(ctx, node)
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axis = norm_axis(attr(node, "axis", 0), rank)
    idx_dims = ctx.dims(node.input[1])
    if axis == lay.axis or idx_dims is None:
        block(ctx, node, "selects channels by index")
        return
    out_axis = lay.axis if lay.axis < axis else lay.axis - 1 + len(idx_dims)
    ctx.set_layout(node.output[0], out_axis, lay.ids)


def pad(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    if len(node.input) > 1:
        found = fixed_input(ctx, node, 1)
    else:
        pads_attr = attr(node, "pads")
        found = None if pads_attr is None else (np.asarray(pads_attr), np.ones(len(pads_attr), dtype=bool))
    has_axes = len(node.input) > 3 and bool(node.input[3])
    axes_found = fixed_input(ctx, node, 3) if has_axes else None
    if found is None or (has_axes and (axes_found is None or not axes_found[1].all())):
        block(ctx, node, "pads by amounts that are not constant")
        return
    axes = [norm_axis(int(a), rank) for a in axes_found[0]] if axes_found is not None else list(range(rank))
    pads, fixed = [int(p) for p in found[0]], found[1]
    if len(pads) != 2 * len(axes):
        block(ctx, node, "pads by amounts that do not match its axes")
        return
    if lay.axis not in axes:
        ctx.set_layout(node.output[0], lay.axis, lay.ids)
        return
    k = axes.index(lay.axis)
    if not (fixed[k] and fixed[k + len(axes)]):
        block(ctx, node, "pads the channel axis by amounts that depend on the input or channel sizes")
        return
    before, after = pads[k], pads[k + len(axes)]
    if before == after == 0:
        ctx.set_layout(node.output[0], lay.axis, lay.ids)
        return
    if before < 0 or after < 0 or attr(node, "mode", b"constant") not in (b"constant", "constant"):
        block(ctx, node, "crops or reflects along the channel axis")
        return
    reason = f"padding channel added by {describe(node)}"
    ids = np.concatenate([ctx.fresh_frozen(before, reason), lay.ids, ctx.fresh_frozen(after, reason)])
    ctx.set_layout(node.output[0], lay.axis, ids)


def transpose(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    ctx.set_layout(node.output[0], perm.index(lay.axis), lay.ids)


def resize(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axes = attr(node, "axes", None)
    axes = [norm_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    if lay.axis in axes:
        k = axes.index(lay.axis)
        scales = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        sizes = shapevec(ctx, node, 3) if len(node.input) > 3 and node.input[3] else None
        if len(node.input) > 3 and node.input[3]:
            if sizes is None or not keeps_count(ctx, sizes[k], lay.ids, describe(node)):
                block(ctx, node, "resizes to a channel count it computes in a way no rule follows")
                return
        elif scales is None or float(scales[k]) != 1.0:
            block(ctx, node, "scales the channel axis")
            return
    ctx.set_layout(node.output[0], lay.axis, lay.ids)


# --- ops that only move data around: push channel positions through them with numpy

def reshape(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if node.input[0] in ctx.shapevecs and node.op_type in ("Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            shapevec_passthrough(ctx, node)
        return
    in_dims = ctx.dims(node.input[0])
    out_dims = ctx.dims(node.output[0])
    if in_dims is None:
        block(ctx, node, "reshapes a tensor of unknown shape")
        return
    # batch pushed as 1; the channel axis has as many positions as ids even where inference lost its size
    shape = [len(lay.ids) if i == lay.axis else (1 if i == 0 and not isinstance(d, int) else d)
             for i, d in enumerate(in_dims)]
    if not is_static(shape):
        block(ctx, node, "reshapes a tensor with dynamic dimensions")
        return
    moved = push_positions(ctx, node, shape, lay.axis)
    found = channel_axis(moved) if moved is not None else None
    if out_dims is None and moved is not None and node.op_type == "Reshape":
        out_dims = [None] * moved.ndim  # inference lost the sizes; the target spells out the rank
    if found is None or out_dims is None or not static_channel_dim(ctx, node, found[0], out_dims):
        block(ctx, node, "reshapes channels in a way that cannot be followed")
        return
    axis, rows = found
    for row in rows:
        if len(row) > 1:
            ctx.tie(np.full(len(row) - 1, lay.ids[row[0]]), lay.ids[row[1:]])
    out_ids = lay.ids[[row[0] for row in rows]]
    if node.op_type == "Reshape" and not reshape_target_follows(ctx, node, axis, out_ids, lay):
        block(ctx, node, "has a target shape whose channel entry cannot be rewritten")
        return
    ctx.set_layout(node.output[0], axis, out_ids)


UNARY = """Relu LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh Clip Elu Selu Celu Softplus Softsign Mish Gelu
    Erf Exp Log Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Not Dropout Identity Cast CastLike
    ThresholdedRelu IsNaN IsInf Shrink""".split()
BINARY = "Add Sub Mul Div Max Min Sum Mean Pow Where Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor".split()
POOLS = "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
REDUCES = """ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceSumSquare""".split()

RULES: dict[str, Callable[[Context, onnx.NodeProto], None]] = {
    # produce (and consume): new channels on the output
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    # pass: channels unchanged (constant per-channel inputs become carriers)
    **{op: elementwise for op in UNARY},
    **{op: pool for op in POOLS},
    "BatchNormalization": batch_norm,
    "InstanceNormalization": instance_norm,
    "LayerNormalization": layer_norm,
    "LpNormalization": lp_norm,
    "Softmax": softmax, "LogSoftmax": softmax, "Hardmax": softmax,
    **{op: reduce for op in REDUCES},
    "ArgMax": arg_reduce, "ArgMin": arg_reduce,
    "Resize": resize,
    "Pad": pad,
    # unify: broadcasting binary ops tie channels position by position
    **{op: elementwise for op in BINARY},
    # concat / split: composite spaces with offsets
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    # reshape: positions pushed through with numpy
    "Transpose": transpose,
    "Reshape": reshape,
    "Flatten": reshape,
    "Squeeze": reshape,
    "Unsqueeze": reshape,
    # shape values: tracked so that computed Reshape/Resize targets stay consistent
    "Shape": shape_rule,
}
