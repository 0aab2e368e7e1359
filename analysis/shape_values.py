"""Shape values: the small integer tensors a graph computes about its own shapes, followed so that pruning keeps
them right.

Two kinds are tracked while the rules walk the graph:
- *shape vectors* (`ctx.shapevecs`): the 1-D outputs of Shape and what Gather/Slice/Concat/arithmetic make of
  them, element by element (`Elem`: a constant, a channel count, or something pruning does not change), so
  that a Reshape/Resize/Slice reading one can be rewritten or checked to stay consistent;
- *scenario values* (`ctx.variants`): small constant-only computations (TF-"SAME" pads computed from Shape)
  evaluated under several channel counts and open dims, to tell which of their elements are constants.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnx_prune.analysis.channels import Context, CountConstraint, Elem
from onnx_prune.analysis.layers import attr
from onnx_prune.analysis.rule_basics import block, describe
from onnx_prune.runtime.shapes import EVALUATED as FOLDABLE, FOLD_LIMIT, evaluate

INT64_MAX = 2**63 - 1


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
        ctx.freeze_tensor(data, f"{describe(node)} reads a shape that could not be inferred")
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


def shapevec_gather(ctx: Context, node: onnx.NodeProto) -> None:
    elems, idx = ctx.shapevecs[node.input[0]], ctx.const(node.input[1])
    if idx is None or attr(node, "axis", 0) != 0:
        block(ctx, node, "gathers from a shape with indices that are not constant")
        return
    ctx.shapevecs[node.output[0]] = [elems[int(i)] for i in idx.reshape(-1)]


def shapevec_slice(ctx: Context, node: onnx.NodeProto) -> None:
    elems = ctx.shapevecs[node.input[0]]
    bounds = [ctx.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    starts, ends, _axes, steps = bounds
    if starts is None or ends is None:
        block(ctx, node, "slices a shape with bounds that are not constant")
        return
    step = int(steps[0]) if steps is not None else 1
    ctx.shapevecs[node.output[0]] = elems[slice(int(starts[0]), int(min(ends[0], INT64_MAX)), step)]


def shapevec_passthrough(ctx: Context, node: onnx.NodeProto) -> None:
    ctx.shapevecs[node.output[0]] = ctx.shapevecs[node.input[0]]


def shapevec_arith(ctx: Context, node: onnx.NodeProto) -> None:
    """Arithmetic on shape elements.  A channel count combined with constants (TorchScript writes C // 2 for a
    channel shuffle and (C + 1) // 2 for a chunk) stays tracked, as a multiple of the count; consumers check
    that it stays consistent.  Anything else involving a channel count freezes it."""
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}
    vecs = [shapevec(ctx, node, i) for i in range(len(node.input))]
    op = ops.get(node.op_type)
    if op is None or any(v is None for v in vecs) or len({len(v) for v in vecs} - {1}) > 1:
        for name in node.input:
            ctx.freeze_tensor(name, f"channel count used in arithmetic by {describe(node)}")
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
                ctx.freeze(a.ids, f"channel count used in arithmetic by {describe(node)}")
            out.append(Elem("other", value))
    ctx.shapevecs[node.output[0]] = out


def has_shapevec_input(ctx: Context, node: onnx.NodeProto) -> bool:
    return any(name in ctx.shapevecs for name in node.input if name)

# --- shape elements kept right after pruning: counts, Slice bounds, Pad amounts, Reshape targets

def keeps_count(ctx: Context, elem: Elem, ids: np.ndarray, where: str = "") -> bool:
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


def slice_bound(ctx: Context, node: onnx.NodeProto, index: int, vector: list[Elem], k: int,
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


def fixed_input(ctx: Context, node: onnx.NodeProto, index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A Pad input's value and which elements are fixed: a constant (all fixed), or a computation followed
    under scenarios (TF-"SAME" pads computed from Shape: spatial amounts vary with the input size, the
    channel amounts are constant zeros)."""
    name = node.input[index] if len(node.input) > index else ""
    value = ctx.const(name)
    if value is not None:
        return value.reshape(-1), np.ones(value.size, dtype=bool)
    found = ctx.invariant(name) if name else None
    return None if found is None else (found[0].reshape(-1), found[1].reshape(-1))


def static_channel_dim(ctx: Context, node: onnx.NodeProto, axis: int, out_dims: list) -> bool:
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


def reshape_target_follows(ctx: Context, node: onnx.NodeProto, axis: int, out_ids, lay) -> bool:
    target = shapevec(ctx, node, 1)
    if any(e.kind == "chan" for k, e in enumerate(target) if k != axis):
        return False
    elem = target[axis]
    if elem.kind == "const" and elem.value == 0 and not attr(node, "allowzero", 0):
        return axis == lay.axis and len(out_ids) == len(lay.ids)  # copies the input's channel dim
    return keeps_count(ctx, elem, out_ids, describe(node))

