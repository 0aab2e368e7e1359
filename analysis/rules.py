"""How each ONNX op touches channels: one rule per op, collected in `RULES`.

A rule reads the `Layout`s of a node's inputs from the `Context` and writes its outputs' layouts; it ties
channels that must go together, records weight slices (`ctx.member`) and shape integers (`ctx.shape_edit`)
that follow channels, and freezes what it cannot follow.  An op missing from the table is never guessed at:
`block` freezes every channel that reaches it.  Adding an op is adding one entry.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from onnx_prune.analysis.channels import Context, CountConstraint, Elem, subgraph_reads
from onnx_prune.analysis.layers import weight_axes
from onnx_prune.runtime.shapes import EVALUATED as FOLDABLE, FOLD_LIMIT, evaluate

INT64_MAX = 2**63 - 1


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _what(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name}'"


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


# --- the default: anything not understood freezes the channels that reach it

def block(ctx: Context, node: onnx.NodeProto, why: str = "") -> None:
    reason = f"{_what(node)} {why or 'is not understood by any channel rule'}"
    for name in node.input:
        if name:
            ctx.freeze_tensor(name, reason)


def freeze_outer_scope_uses(ctx: Context, node: onnx.NodeProto) -> None:
    """Tensors an If/Loop/Scan body reads from the enclosing graph cannot change shape."""
    for name in sorted(subgraph_reads(node)):
        ctx.freeze_tensor(name, f"read inside a subgraph of {_what(node)}")


def apply_rule(ctx: Context, node: onnx.NodeProto) -> None:
    if node.domain not in ("", "ai.onnx"):
        block(ctx, node, f"is a custom op of domain '{node.domain}'")
        return
    fold_scenarios(ctx, node)
    RULES.get(node.op_type, block)(ctx, node)


# --- shape computations evaluated under scenarios (TF-"SAME" pads computed from Shape)

# A scenario gives every channel count C and every open dim a value: the first is the model as it is (open dims
# OPEN_DIMS[0]), the others shrink channel counts (as pruning does) and change open dims.  Elements that come
# out equal in all of them are constants of the model, whatever its input size and however it is pruned.
OPEN_DIMS = (5, 9, 16)


def _scenario_channels(count: int, k: int) -> int:
    return (count, max(count - 1, 1), max(count // 2, 1))[k]


def _shape_scenarios(ctx: Context, node: onnx.NodeProto) -> list[np.ndarray] | None:
    dims = ctx.dims(node.input[0])
    if dims is None:
        return None
    lay = ctx.layout(node.input[0])
    start, end = attr(node, "start", 0), attr(node, "end", None)
    runs = []
    for k in range(len(OPEN_DIMS)):
        values = [_scenario_channels(len(lay.ids), k) if lay is not None and i == lay.axis else
                  d if isinstance(d, int) else OPEN_DIMS[k] for i, d in enumerate(dims)]
        runs.append(np.asarray(values[start:end], dtype=np.int64))
    return runs


def fold_scenarios(ctx: Context, node: onnx.NodeProto) -> None:
    """Evaluate a shape computation (no channel tensor among its inputs, each input a tracked computed value or a
    small constant: Conv2dStaticSamePadding writes its pads as ConstantOfShape/Concat/Reshape/Slice/Transpose
    of constants) once per scenario, with the bounded numpy ops of `runtime.shapes.evaluate`."""
    if node.op_type == "Shape":
        runs = _shape_scenarios(ctx, node)
        if runs is not None:
            ctx.variants[node.output[0]] = runs
        return
    names = [n for n in node.input if n]
    if not names or any(ctx.layout(n) is not None for n in names) or node.op_type not in FOLDABLE:
        return
    constants = {n: ctx.const(n) for n in names if n not in ctx.variants}
    if any(v is None or v.size > FOLD_LIMIT for v in constants.values()):
        return
    outs_per_run = []
    for k in range(len(OPEN_DIMS)):
        args = [(ctx.variants[n][k] if n in ctx.variants else constants[n]) if n else None for n in node.input]
        outs = evaluate(node, args)
        if outs is None:
            return
        outs_per_run.append(outs)
    for i, name in enumerate(node.output):
        if name:
            ctx.variants[name] = [outs[i] for outs in outs_per_run]


# --- shape vectors: the 1-D int tensors that Shape produces and Reshape/Resize consume

def shapevec(ctx: Context, node: onnx.NodeProto, index: int) -> list[Elem] | None:
    """The tracked elements of a shape-like input: computed from Shape, or a small int constant."""
    name = node.input[index] if index < len(node.input) else ""
    if name in ctx.shapevecs:
        return ctx.shapevecs[name]
    value = ctx.const(name)
    if value is None:  # computed from constants only (x.view(x.size(0), -1) unsqueezes a -1): fixed, not editable
        found = ctx.invariant(name) if name else None
        if found is None or not found[1].all() or found[0].dtype.kind not in "iu" or found[0].ndim > 1:
            return None
        return [Elem("const", int(v)) for v in found[0].reshape(-1)]
    if value.dtype.kind not in "iu" or value.ndim > 1:
        return None
    return [Elem("const", int(v), (node.name, index, i)) for i, v in enumerate(value.reshape(-1))]


def shape_rule(ctx: Context, node: onnx.NodeProto) -> None:
    data = node.input[0]
    dims, lay = ctx.dims(data), ctx.layout(data)
    if dims is None:
        ctx.freeze_tensor(data, f"{_what(node)} reads a shape that could not be inferred")
        return
    elems = []
    for i, d in enumerate(dims):
        if lay is not None and i == lay.axis:
            elems.append(Elem("chan", len(lay.ids), ids=lay.ids))
        else:
            elems.append(Elem("other", d) if isinstance(d, int) else
                         Elem("other", 1, batch=True) if i == 0 else Elem("other", None))
    start, end = attr(node, "start", 0), attr(node, "end", None)
    ctx.shapevecs[node.output[0]] = elems[start:end]


def _shapevec_gather(ctx: Context, node: onnx.NodeProto) -> None:
    elems, idx = ctx.shapevecs[node.input[0]], ctx.const(node.input[1])
    if idx is None or attr(node, "axis", 0) != 0:
        block(ctx, node, "gathers from a shape with indices that are not constant")
        return
    ctx.shapevecs[node.output[0]] = [elems[int(i)] for i in idx.reshape(-1)]


def _shapevec_slice(ctx: Context, node: onnx.NodeProto) -> None:
    elems = ctx.shapevecs[node.input[0]]
    bounds = [ctx.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    starts, ends, _axes, steps = bounds
    if starts is None or ends is None:
        block(ctx, node, "slices a shape with bounds that are not constant")
        return
    step = int(steps[0]) if steps is not None else 1
    ctx.shapevecs[node.output[0]] = elems[slice(int(starts[0]), int(min(ends[0], INT64_MAX)), step)]


def _shapevec_passthrough(ctx: Context, node: onnx.NodeProto) -> None:
    ctx.shapevecs[node.output[0]] = ctx.shapevecs[node.input[0]]


def _shapevec_arith(ctx: Context, node: onnx.NodeProto) -> None:
    """Arithmetic on shape elements.  A channel count combined with constants (TorchScript writes C // 2 for a
    channel shuffle and (C + 1) // 2 for a chunk) stays tracked, as a multiple of the count; consumers check
    that it stays consistent.  Anything else involving a channel count freezes it."""
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}
    vecs = [shapevec(ctx, node, i) for i in range(len(node.input))]
    op = ops.get(node.op_type)
    if op is None or any(v is None for v in vecs) or len({len(v) for v in vecs} - {1}) > 1:
        for name in node.input:
            ctx.freeze_tensor(name, f"channel count used in arithmetic by {_what(node)}")
        return
    out = []
    for k in range(max(len(v) for v in vecs)):
        args = [v[k if len(v) > 1 else 0] for v in vecs]
        values = [a.value for a in args]
        value = int(op(*values)) if None not in values and 0 not in values[1:] else None
        chans = [a for a in args if a.kind == "chan"]
        if not chans:
            out.append(Elem("other", value))
        elif len(chans) == 1 and value is not None and all(a.value is not None for a in args):
            out.append(Elem("chan", value, ids=chans[0].ids, scale=value / len(chans[0].ids)))
        else:
            for a in chans:
                ctx.freeze(a.ids, f"channel count used in arithmetic by {_what(node)}")
            out.append(Elem("other", value))
    ctx.shapevecs[node.output[0]] = out


def _has_shapevec_input(ctx: Context, node: onnx.NodeProto) -> bool:
    return any(name in ctx.shapevecs for name in node.input if name)


# --- elementwise ops: unary pass-through and broadcasting binary ops that tie channels

def elementwise(ctx: Context, node: onnx.NodeProto) -> None:
    """Output channels = input channels; inputs meeting on the same axis are tied position by position."""
    if not any(ctx.layout(n) for n in node.input):
        if _has_shapevec_input(ctx, node):
            (_shapevec_passthrough if len(node.input) == 1 or node.op_type in ("Cast", "Identity")
             else _shapevec_arith)(ctx, node)
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
            ctx.freeze(lay.ids, f"broadcast across channels by {_what(node)}")
    for i, name in enumerate(node.input):
        if not name or ctx.layout(name) is not None:
            continue
        dims = ctx.dims(name)
        if dims is None:
            ctx.freeze(ref, f"{_what(node)} combines channels with '{name}' of unknown shape")
            continue
        k = axis - (out_rank - len(dims))
        if k < 0 or dims[k] == 1:
            continue  # broadcast along the channel axis: nothing to slice
        if ctx.is_const(name) and dims[k] == size:
            ctx.member("carrier", node, i, k, ref)  # per-channel constant (bias, scale, PRelu slope)
        else:
            ctx.freeze(ref, f"{_what(node)} combines channels with '{name}', which no rule tracks")
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
        ctx.freeze(lay.ids, f"{_what(node)} reads channels on axis 1, not axis {lay.axis}")
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
            out = ctx.fresh_frozen(n_out, f"{_what(node)} is depthwise over channels no rule tracks")
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
            ctx.freeze(out, f"{_what(node)} has a bias of shape {bias_dims}")
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
        _along_axis_ok(ctx, node, lambda a, r: _norm(axis, r) == a)
    else:  # before opset 13 the input is coerced to 2-D at `axis`
        _along_axis_ok(ctx, node, lambda a, r: _norm(axis, r) <= a)


def layer_norm(ctx: Context, node: onnx.NodeProto) -> None:
    axis = attr(node, "axis", -1)
    _along_axis_ok(ctx, node, lambda a, r: a >= _norm(axis, r))


def lp_norm(ctx: Context, node: onnx.NodeProto) -> None:
    axis = attr(node, "axis", -1)
    _along_axis_ok(ctx, node, lambda a, r: _norm(axis, r) == a)


def reduce(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if _has_shapevec_input(ctx, node):
            block(ctx, node, "reduces a shape")
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        if axes is None:
            block(ctx, node, "reduces over axes that are not constant")
            return
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            ctx.set_layout(node.output[0], lay.axis, lay.ids)
        else:
            block(ctx, node, "reduces over every axis, channels included")
        return
    axes = [_norm(int(a), rank) for a in np.reshape(axes, -1)]
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
    axis = _norm(attr(node, "axis", 0), rank)
    if axis == lay.axis:
        block(ctx, node, "returns indices along the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    ctx.set_layout(node.output[0], lay.axis if keep or lay.axis < axis else lay.axis - 1, lay.ids)


# --- ops that cut and join along an axis

def concat(ctx: Context, node: onnx.NodeProto) -> None:
    laid = [ctx.layout(n) for n in node.input]
    if not any(laid):
        if _has_shapevec_input(ctx, node):
            vecs = [shapevec(ctx, node, i) for i in range(len(node.input))]
            if any(v is None for v in vecs):
                block(ctx, node, "joins shape values that are not tracked")
                return
            ctx.shapevecs[node.output[0]] = [e for v in vecs for e in v]
        return
    rank = len(ctx.dims(node.output[0]) or ctx.dims(next(n for n, l in zip(node.input, laid) if l)) or [])
    axis = _norm(attr(node, "axis"), rank)
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
        parts.append(ctx.fresh_frozen(dims[axis], f"{_what(node)} joins them with '{name}', which no rule tracks"))
    ctx.set_layout(node.output[0], axis, np.concatenate(parts))


def split(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if _has_shapevec_input(ctx, node):
            block(ctx, node, "splits a shape")
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axis = _norm(attr(node, "axis", 0), rank)
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
            _shapevec_slice(ctx, node)
        return
    (_, _, axes, steps), missing = _slice_params(ctx, node)
    starts, ends = shapevec(ctx, node, 1), shapevec(ctx, node, 2)
    rank = len(ctx.dims(node.input[0]) or [])
    if starts is None or ends is None or set(missing) - set(node.input[1:3]):
        block(ctx, node, "slices with bounds that are neither constant nor computed from the channel count")
        return
    axes = [_norm(int(a), rank) for a in (axes if axes is not None else range(len(starts)))]
    if lay.axis not in axes:
        ctx.set_layout(node.output[0], lay.axis, lay.ids)
        return
    k = axes.index(lay.axis)
    if steps is not None and int(steps[k]) != 1:
        block(ctx, node, "slices channels with a step other than 1")
        return
    bounds = [_slice_bound(ctx, node, index, vector, k, lay.ids) for index, vector in ((1, starts), (2, ends))]
    if None in bounds:
        block(ctx, node, "slices channels at a bound computed in a way no rule follows")
        return
    ctx.set_layout(node.output[0], lay.axis, lay.ids[bounds[0]:bounds[1]])


def _slice_bound(ctx: Context, node: onnx.NodeProto, index: int, vector: list[Elem], k: int,
                 ids: np.ndarray) -> int | None:
    """A Slice bound on the channel axis, made to follow pruning: it becomes the kept count before it.  A bound
    computed from the channel count (TorchScript's chunk: (C + 1) // 2) is replaced by that constant; the
    model's channel counts do not depend on its input, so this changes nothing else."""
    size, elem = len(ids), vector[k]
    if elem.value is None or elem.kind == "other":
        return None
    bound = int(np.clip(elem.value + size if elem.value < 0 else elem.value, 0, size))
    if elem.kind == "const" and elem.source is not None:
        ctx.shape_edit(("input", *elem.source), ids[:bound])
    elif all(e.value is not None for e in vector):
        ctx.shape_edit(("input", node.name, index, k), ids[:bound], tuple(e.value for e in vector))
    else:
        return None
    return bound


def gather(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if node.input[0] in ctx.shapevecs:
            _shapevec_gather(ctx, node)
        return
    rank = len(ctx.dims(node.input[0]) or [])
    axis = _norm(attr(node, "axis", 0), rank)
    idx_dims = ctx.dims(node.input[1])
    if axis == lay.axis or idx_dims is None:
        block(ctx, node, "selects channels by index")
        return
    out_axis = lay.axis if lay.axis < axis else lay.axis - 1 + len(idx_dims)
    ctx.set_layout(node.output[0], out_axis, lay.ids)


def _pad_input(ctx: Context, node: onnx.NodeProto, index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A Pad input's value and which elements are fixed: a constant (all fixed), or a computation followed
    under scenarios (TF-"SAME" pads computed from Shape: spatial amounts vary with the input size, the
    channel amounts are constant zeros)."""
    name = node.input[index] if len(node.input) > index else ""
    value = ctx.const(name)
    if value is not None:
        return value.reshape(-1), np.ones(value.size, dtype=bool)
    found = ctx.invariant(name) if name else None
    return None if found is None else (found[0].reshape(-1), found[1].reshape(-1))


def pad(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = len(ctx.dims(node.input[0]) or [])
    if len(node.input) > 1:
        found = _pad_input(ctx, node, 1)
    else:
        pads_attr = attr(node, "pads")
        found = None if pads_attr is None else (np.asarray(pads_attr), np.ones(len(pads_attr), dtype=bool))
    has_axes = len(node.input) > 3 and bool(node.input[3])
    axes_found = _pad_input(ctx, node, 3) if has_axes else None
    if found is None or (has_axes and (axes_found is None or not axes_found[1].all())):
        block(ctx, node, "pads by amounts that are not constant")
        return
    axes = [_norm(int(a), rank) for a in axes_found[0]] if axes_found is not None else list(range(rank))
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
    reason = f"padding channel added by {_what(node)}"
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
    axes = [_norm(a, rank) for a in axes] if axes is not None else list(range(rank))
    if lay.axis in axes:
        k = axes.index(lay.axis)
        scales = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        sizes = shapevec(ctx, node, 3) if len(node.input) > 3 and node.input[3] else None
        if len(node.input) > 3 and node.input[3]:
            if sizes is None or not _keeps_count(ctx, sizes[k], lay.ids, _what(node)):
                block(ctx, node, "resizes to a channel count it computes in a way no rule follows")
                return
        elif scales is None or float(scales[k]) != 1.0:
            block(ctx, node, "scales the channel axis")
            return
    ctx.set_layout(node.output[0], lay.axis, lay.ids)


def _keeps_count(ctx: Context, elem: Elem, ids: np.ndarray, where: str = "") -> bool:
    """Can this shape element be kept equal to the number of kept positions among `ids`?"""
    if elem.kind == "chan":  # computed at run time: right if the counts scale together (checked later)
        ctx.count_constraints.append(CountConstraint(elem.ids, elem.scale, ids,
                                                     f"{where or 'a shape'} computes a channel count that "
                                                     "pruning could make inconsistent"))
        return True
    if elem.kind == "const" and elem.value == -1:
        return True  # inferred from the other dims: follows by itself
    if elem.kind == "const" and elem.source is not None and elem.value is not None:
        node, index, element = elem.source
        ctx.shape_edit(("input", node, index, element), ids)
        return True
    return False


# --- ops that only move data around: push channel positions through them with numpy

def _numpy_reshape(ctx: Context, node: onnx.NodeProto, positions: np.ndarray) -> np.ndarray | None:
    op = node.op_type
    if op == "Flatten":
        axis = _norm(attr(node, "axis", 1), positions.ndim)
        return positions.reshape(int(np.prod(positions.shape[:axis])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = ctx.const(node.input[1])
            if axes is None:
                return None
        if op == "Squeeze":
            axes = tuple(_norm(int(a), positions.ndim) for a in axes) if axes is not None else None
            return np.squeeze(positions, axis=axes)
        out_rank = positions.ndim + len(axes)
        return np.expand_dims(positions, tuple(sorted(_norm(int(a), out_rank) for a in axes)))
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


def _channel_axis(positions: np.ndarray) -> tuple[int, list[np.ndarray]] | None:
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


def reshape(ctx: Context, node: onnx.NodeProto) -> None:
    lay = ctx.layout(node.input[0])
    if lay is None:
        if node.input[0] in ctx.shapevecs and node.op_type in ("Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            _shapevec_passthrough(ctx, node)
        return
    in_dims = ctx.dims(node.input[0])
    out_dims = ctx.dims(node.output[0])
    if in_dims is None:
        block(ctx, node, "reshapes a tensor of unknown shape")
        return
    # batch pushed as 1; the channel axis has as many positions as ids even where inference lost its size
    shape = [len(lay.ids) if i == lay.axis else (1 if i == 0 and not isinstance(d, int) else d)
             for i, d in enumerate(in_dims)]
    if not _static(shape):
        block(ctx, node, "reshapes a tensor with dynamic dimensions")
        return
    size = len(lay.ids)
    index_shape = [1] * len(shape)
    index_shape[lay.axis] = size
    positions = np.broadcast_to(np.arange(size).reshape(index_shape), shape)
    moved = _numpy_reshape(ctx, node, positions)
    found = _channel_axis(moved) if moved is not None else None
    if out_dims is None and moved is not None and node.op_type == "Reshape":
        out_dims = [None] * moved.ndim  # inference lost the sizes; the target spells out the rank
    if found is None or out_dims is None or not _static_channel_dim(ctx, node, found[0], out_dims):
        block(ctx, node, "reshapes channels in a way that cannot be followed")
        return
    axis, rows = found
    for row in rows:
        if len(row) > 1:
            ctx.tie(np.full(len(row) - 1, lay.ids[row[0]]), lay.ids[row[1:]])
    out_ids = lay.ids[[row[0] for row in rows]]
    if node.op_type == "Reshape" and not _reshape_target_follows(ctx, node, axis, out_ids, lay):
        block(ctx, node, "has a target shape whose channel entry cannot be rewritten")
        return
    ctx.set_layout(node.output[0], axis, out_ids)


def _static_channel_dim(ctx: Context, node: onnx.NodeProto, axis: int, out_dims: list) -> bool:
    """The output's channel axis must not absorb the batch (we pushed positions with a batch of 1): its size
    is static, or the target shape spells it as a channel count or a constant."""
    if isinstance(out_dims[axis], int):
        return True
    target = shapevec(ctx, node, 1) if node.op_type == "Reshape" else None
    if target is None:
        return False
    if target[axis].kind in ("chan", "const") and target[axis].value not in (-1, 0):
        return True
    # x.view(x.size(0), -1): the batch is spelled out in front, so the -1 takes only the static dims after it
    return (axis != 0 and target[0].batch and target[axis].kind == "const" and target[axis].value == -1
            and all(e.value is not None and e.value > 0 and not e.batch
                    for k, e in enumerate(target) if k not in (0, axis)))


def _reshape_target_follows(ctx: Context, node: onnx.NodeProto, axis: int, out_ids, lay) -> bool:
    target = shapevec(ctx, node, 1)
    if any(e.kind == "chan" for k, e in enumerate(target) if k != axis):
        return False
    elem = target[axis]
    if elem.kind == "const" and elem.value == 0 and not attr(node, "allowzero", 0):
        return axis == lay.axis and len(out_ids) == len(lay.ids)  # copies the input's channel dim
    return _keeps_count(ctx, elem, out_ids, _what(node))


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
