"""The one rewrite: apply a Plan to every weight slice, shape constant and attribute its groups own.

Requires: `analysis` was built from this very model (normalised).  Ensures: onnx.checker passes, graph outputs
keep their shapes, the input model is not mutated.  Pruning and merging differ only in the Plan's `fold`.

A group's `shift` (the constant its consumers lose per channel) is folded into every consumer's bias first,
with the original weights: ``b += sum_c sum_taps W[:, c, taps] * shift[c]`` for a Conv (per conv group),
``alpha * shift @ B`` for a Gemm, ``shift @ W`` for a MatMul (into the Add of a constant that follows it, or a new
Add).  A consumer without a bias gets one, sliced with the layer's output channels like any producer bias.
Exact for Gemm/MatMul and for Conv away from zero-padded borders; for a ConvTranspose the kernel sum is divided
by the stride (the average over output pixels).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.analysis.layers import attr, readers_of, weight_axes
from onnx_prune.passes.allocate import kept_ids
from onnx_prune.passes.base import Pass, PassResult, PreconditionError, copy_model, model_without_weights
from onnx_prune.passes.plan import Plan

DENSE_FOLD_LIMIT = 4_000_000  # fold matrices larger than this are built sparse


class ApplyPlanPass(Pass):
    def __init__(self, analysis: ChannelAnalysis, plan: Plan):
        self.analysis = analysis
        self.plan = plan

    def requires(self, model: onnx.ModelProto) -> None:
        """The analysis describes this model: every weight it slices is there, long enough on its axis."""
        super().requires(model)
        dims = {t.name: list(t.dims) for t in model.graph.initializer}
        for group in self.analysis.groups:
            for m in group.members:
                shape = dims.get(m.param)
                if shape is None or m.axis >= len(shape) or (len(m.positions) and shape[m.axis] <= m.positions.max()):
                    raise PreconditionError(f"{self.name}: the analysis does not describe this model ({m.param!r} "
                                            f"is missing or too small on axis {m.axis})")

    def call(self, model: onnx.ModelProto) -> PassResult:
        sizes = {g.id: g.size for g in self.analysis.groups}
        if not self.plan.removes_anything(sizes):
            return PassResult(copy_model(model), False)
        kept = kept_ids(self.analysis, self.plan)
        param_edits = _param_edits(self.analysis)
        edited = {param for param, edits in param_edits.items()
                  if not all(kept[ids].all() and not self._combines(ids, role) for _, ids, role in edits)}
        out, source = _copy_except(model, edited)
        graph = out.graph
        param_edits.update(_fold_shifts(out, self.analysis, self.plan, param_edits, source))
        inits = {t.name: t for t in graph.initializer}
        for param, edits in param_edits.items():
            if all(kept[ids].all() and not self._combines(ids, role) for _, ids, role in edits):
                continue
            array = _read(param, inits, source)
            for axis, ids, role in edits:
                if self._combines(ids, role):
                    array = _combine(array, axis, ids, self.analysis, self.plan, kept, _matrix_for(role))
                elif not kept[ids].all():
                    array = np.take(array, np.nonzero(kept[ids])[0], axis=axis)
            inits[param].CopyFrom(numpy_helper.from_array(array, param))
            source.pop(param, None)
        for name, tensor in source.items():  # (none left: every edited weight was written above)
            inits[name].CopyFrom(tensor)
        _apply_shape_edits(out, self.analysis, kept)
        _update_value_info(graph, self.analysis, kept)
        return PassResult(out, True)  # ensures (Pass): checker, output shapes, input untouched

    def _combines(self, ids: np.ndarray, role: str) -> bool:
        """Does some group behind these positions mix channels (fold for consumers, merge for the rest)?"""
        attribute = _matrix_for(role)
        plans = (self.plan.groups.get(int(g)) for g in np.unique(self.analysis.id_group[ids]))
        return any(p is not None and getattr(p, attribute) is not None for p in plans)


def _copy_except(model: onnx.ModelProto, edited: set[str]) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` in which the weights about to be rewritten are placeholders (name, type and dims, no
    data) in their places, and those weights of `model` by name: the rewrite reads them from there and writes
    each result into its placeholder, so the whole model is never copied before it is sliced (peak memory)."""
    out = model_without_weights(model)
    source = {}
    for tensor in model.graph.initializer:
        if tensor.name in edited:
            out.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            source[tensor.name] = tensor
        else:
            out.graph.initializer.append(tensor)
    return out, source


def _read(name: str, inits: dict[str, onnx.TensorProto], source: dict[str, onnx.TensorProto]) -> np.ndarray:
    """A weight's values: from the input model while its place in the copy is a placeholder."""
    return numpy_helper.to_array(source[name] if name in source else inits[name])


def _shift_nodes(analysis: ChannelAnalysis, plan: Plan) -> list[str]:
    nodes = {m.node for g, p in plan.groups.items() if p.shifts for m in analysis.groups[g].by_role("consumer")}
    return sorted(nodes)


def _read_shift(analysis: ChannelAnalysis, plan: Plan, node: onnx.NodeProto) -> np.ndarray | None:
    """The shift at every position of the consumer's input channel axis (0 where no group shifts)."""
    lay = analysis.layouts.get(node.input[0])
    if lay is None:
        return None
    groups, channels = analysis.id_group[lay.ids], analysis.id_channel[lay.ids]
    out = np.zeros(len(lay.ids))
    for g in np.unique(groups):
        gplan = plan.groups.get(int(g))
        vector = None if gplan is None else gplan.shift_for(node.name)
        if vector is None:
            continue
        if len(vector) != analysis.groups[int(g)].size:
            raise ValueError(f"group {int(g)}: shift has {len(vector)} values for {analysis.groups[int(g)].size} "
                             "channels")
        here = groups == g
        out[here] = vector[channels[here]]
    return out if np.any(out != 0) else None


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _bias_delta(node: onnx.NodeProto, weight: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """What the consumer's output gains per output channel when its inputs carry `shift` (original weights)."""
    if node.op_type == "Conv":
        n_out, per_group = weight.shape[:2]
        group = attr(node, "group", 1)
        # summed in float64 as it is read (the same sums as on a float64 copy, without the copy)
        taps = weight.reshape(n_out, per_group, -1).sum(axis=2, dtype=np.float64)
        by_group = shift.reshape(group, per_group)[np.arange(n_out) // (n_out // group)]
        return np.einsum("oi,oi->o", taps, by_group)
    if node.op_type == "ConvTranspose":
        taps = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2, dtype=np.float64)
        return shift @ taps / float(np.prod(attr(node, "strides", [1])))
    w = weight.astype(np.float64)
    # Gemm, MatMul (alpha 1): the weight read as (inputs, outputs)
    return attr(node, "alpha", 1.0) * (shift @ np.moveaxis(w, weight_axes(node, w.ndim)[1], 0))


def _fold_shifts(model: onnx.ModelProto, analysis: ChannelAnalysis, plan: Plan,
                 edits: dict[str, list], source: dict[str, onnx.TensorProto]) -> dict[str, list]:
    """Add every consumer's bias delta in place (original weights); new or copied biases are returned with the
    edits that slice them with the layer's output channels.  `source`: the weights `model` holds as placeholders
    (`_copy_except`), read from there; a bias written here leaves it."""
    nodes = _shift_nodes(analysis, plan)
    if not nodes:
        return {}
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list, readers_of(model))
    outputs = {o.name for o in graph.output}
    new_edits: dict[str, list] = {}
    for name in nodes:
        node = by_name[name]
        shift = _read_shift(analysis, plan, node)
        if shift is None:
            continue
        weight = _read(node.input[1], inits, source)
        delta = _bias_delta(node, weight, shift)
        out_lay = analysis.layouts.get(node.output[0])
        out_ids = None if out_lay is None else out_lay.ids
        context = (graph, inits, readers, edits, new_edits, weight.dtype, out_ids, source)
        if node.op_type in ("Conv", "ConvTranspose"):
            _add_to_input(node, 2, delta, *context)
        elif node.op_type == "Gemm":
            beta = attr(node, "beta", 1.0)
            has_c = len(node.input) > 2 and bool(node.input[2])
            if not has_c or beta == 0:
                if has_c:
                    readers[node.input[2]].remove(node)
                    node.input[2] = ""
                _set_attribute(node, "beta", 1.0)
                beta = 1.0
            _add_to_input(node, 2, delta / beta, *context)
        else:
            add, index = _bias_add(node, inits, readers, outputs)
            if add is None:
                add, index = _insert_add(graph, node, weight.dtype, inits, readers)
            _add_to_input(add, index, delta, *context)
    return new_edits


def _bias_add(matmul: onnx.NodeProto, inits, readers, outputs) -> tuple[onnx.NodeProto | None, int]:
    """The Add of a constant that alone reads a MatMul's output (its bias), and the constant's input index."""
    out = matmul.output[0]
    if out in outputs or len(readers[out]) != 1 or readers[out][0].op_type != "Add":
        return None, -1
    add = readers[out][0]
    index = 1 - list(add.input).index(out)
    const = add.input[index]
    dims = list(inits[const].dims) if const in inits else None
    if dims is None or any(d != 1 for d in dims[:-1]):
        return None, -1
    return add, index


def _insert_add(graph, matmul: onnx.NodeProto, dtype, inits, readers) -> tuple[onnx.NodeProto, int]:
    """MatMul -> MatMul + Add(bias 0): the output keeps its name, so nothing downstream changes."""
    out = matmul.output[0]
    inner = _unique(f"{out}__unshifted", inits, graph)
    matmul.output[0] = inner
    add = helper.make_node("Add", [inner, ""], [out], name=_unique(f"{matmul.name}__shift", inits, graph))
    position = list(graph.node).index(matmul) + 1
    graph.node.insert(position, add)
    inserted = graph.node[position]
    readers[inner].append(inserted)
    return inserted, 1


def _unique(base: str, inits, graph) -> str:
    taken = set(inits) | {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _add_to_input(node, index, delta, graph, inits, readers, edits, new_edits, dtype, out_ids, source) -> None:
    """node.input[index] += delta (per output channel, on its last axis); in place where this node alone reads
    it and its shape holds, else as a new initializer that follows the output channels."""
    name = node.input[index] if index < len(node.input) else ""
    old = _read(name, inits, source) if name else None
    if old is not None:
        new = old.astype(np.float64) + delta
        dtype = old.dtype
    else:
        new = delta
    new = new.astype(dtype)
    if old is not None and len(readers[name]) == 1 and new.shape == old.shape:
        inits[name].CopyFrom(numpy_helper.from_array(new, name))
        source.pop(name, None)
        return
    new_name = _unique(f"{name or node.name}__shift", inits, graph)
    tensor = numpy_helper.from_array(new, new_name)
    graph.initializer.append(tensor)
    inits[new_name] = graph.initializer[-1]
    while len(node.input) <= index:
        node.input.append("")
    if name:
        readers[name].remove(node)
    node.input[index] = new_name
    readers[new_name].append(node)
    if old is not None and new.shape == old.shape and name in edits:
        new_edits[new_name] = list(edits[name])
    elif out_ids is not None and new.shape[-1] == len(out_ids):
        new_edits[new_name] = [(new.ndim - 1, out_ids, "producer")]


def _matrix_for(role: str) -> str:
    return "fold" if role == "consumer" else "merge"


def _param_edits(analysis: ChannelAnalysis) -> dict[str, list[tuple[int, np.ndarray, str]]]:
    edits: dict[str, list] = defaultdict(list)
    for (param, axis), ids in sorted(analysis.param_ids.items()):
        edits[param].append((axis, ids, analysis.param_roles[(param, axis)]))
    return edits


def position_map(analysis: ChannelAnalysis, plan: Plan, ids: np.ndarray, attribute: str = "merge") -> np.ndarray:
    """The P x K matrix R the rewrite applies along an axis whose positions carry channel `ids`:
    new[..., j] = sum_p old[..., p] R[p, j] (`merge` as for producers' rows, `fold` as for consumers)."""
    return _combine(np.eye(len(ids)), 1, ids, analysis, plan, kept_ids(analysis, plan), attribute)


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same key (0 for the first)."""
    seen: dict[int, int] = defaultdict(int)
    out = np.empty(len(keys), dtype=np.int64)
    for p, key in enumerate(keys.tolist()):
        out[p] = seen[key]
        seen[key] += 1
    return out


def _combine(array: np.ndarray, axis: int, ids: np.ndarray, analysis: ChannelAnalysis, plan: Plan,
             kept: np.ndarray, attribute: str) -> np.ndarray:
    """Weight after folding (consumers) or merging (producers, carriers): new position j = sum over old
    positions p of R[p, j] * W[..., p], R built from the groups' C x K matrices."""
    groups, channels = analysis.id_group[ids], analysis.id_channel[ids]
    # A channel may own several positions (block maps of Flatten into Gemm repeat its id; a grouped conv
    # repeats it under tied ids in every conv group): match the k-th position of a channel with the k-th.
    sub = _occurrence(groups * (int(channels.max(initial=0)) + 1) + channels)
    new_positions = np.nonzero(kept[ids])[0]
    rows, cols, vals = [], [], []
    by_group_sub: dict[tuple[int, int], np.ndarray] = defaultdict(list)
    for p in range(len(ids)):
        by_group_sub[(int(groups[p]), int(sub[p]))].append(p)
    for j, p_new in enumerate(new_positions):
        g = int(groups[p_new])
        gplan = plan.groups.get(g)
        matrix = None if gplan is None else getattr(gplan, attribute)
        if matrix is None:
            rows.append(p_new), cols.append(j), vals.append(1.0)
            continue
        column = int(np.searchsorted(gplan.keep, channels[p_new]))
        olds = np.asarray(by_group_sub[(g, int(sub[p_new]))])
        weights = matrix[channels[olds], column]
        nonzero = weights != 0
        rows.extend(olds[nonzero]), cols.extend([j] * int(nonzero.sum())), vals.extend(weights[nonzero])
    moved = np.moveaxis(array, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1]).astype(np.float64)
    shape = (len(ids), len(new_positions))
    if shape[0] * shape[1] <= DENSE_FOLD_LIMIT:
        fold = np.zeros(shape)
        np.add.at(fold, (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)), vals)
        result = flat @ fold
    else:
        from scipy.sparse import coo_matrix
        result = (coo_matrix((vals, (rows, cols)), shape=shape).T @ flat.T).T
    result = result.astype(array.dtype).reshape(moved.shape[:-1] + (len(new_positions),))
    return np.moveaxis(result, -1, axis)


def _apply_shape_edits(model: onnx.ModelProto, analysis: ChannelAnalysis, kept: np.ndarray) -> None:
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    readers = defaultdict(int, {name: len(nodes) for name, nodes in readers_of(model).items()})
    input_values: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    computed: dict[tuple[str, int], tuple] = {}  # inputs computed at run time, replaced by constants
    for edit in analysis.shape_edits:
        count = int(kept[edit.ids].sum())
        kind, node_name = edit.target[0], edit.target[1]
        node = nodes[node_name]
        if kind == "attr":
            for a in node.attribute:
                if a.name == edit.target[2]:
                    a.i = count
        elif kind == "input":
            input_values[(node_name, edit.target[2])][edit.target[3]] = count
            if edit.computed is not None:
                computed[(node_name, edit.target[2])] = edit.computed
        elif kind == "split":
            input_values[(node_name, -1)][edit.target[2]] = count
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for (node_name, index), values in sorted(input_values.items()):
        node = nodes[node_name]
        if index == -1:  # Split sizes: an input from opset 13, an attribute before
            sizes = [values[k] for k in range(len(node.output))]
            _write_split_sizes(graph, node, sizes, opset, inits, readers)
            continue
        name = node.input[index]
        old = np.asarray(computed[(node_name, index)], dtype=np.int64) if (node_name, index) in computed \
            else numpy_helper.to_array(inits[name])
        new = old.copy().reshape(-1)
        for element, count in values.items():
            new[element] = count
        new = new.reshape(old.shape)
        if np.array_equal(new, old) and (node_name, index) not in computed:
            continue
        _set_input_constant(graph, node, index, new, inits, readers)


def _set_input_constant(graph, node, index, value, inits, readers) -> None:
    """Point node.input[index] at `value`: in place when only this node reads it, else as a new constant."""
    name = node.input[index] if index < len(node.input) else ""
    if name in inits and readers[name] == 1:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    new_name = f"{name or 'split'}__{node.name}"
    tensor = numpy_helper.from_array(value, new_name)
    graph.initializer.append(tensor)
    inits[new_name] = tensor
    readers[new_name] = 1
    while len(node.input) <= index:
        node.input.append("")
    if name:
        readers[name] -= 1
    node.input[index] = new_name


def _write_split_sizes(graph, node, sizes, opset, inits, readers) -> None:
    if opset >= 13:
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)
        _set_input_constant(graph, node, 1, np.asarray(sizes, dtype=np.int64), inits, readers)
    else:
        for a in list(node.attribute):
            if a.name == "split":
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("split", sizes))


def _update_value_info(graph: onnx.GraphProto, analysis: ChannelAnalysis, kept: np.ndarray) -> None:
    """Declared intermediate shapes follow the new channel counts (stale ones would fail the checker)."""
    init_dims = {t.name: list(t.dims) for t in graph.initializer}
    for value in graph.value_info:
        if value.name in init_dims and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, init_dims[value.name]):
                dim.dim_value = size
            continue
        lay = analysis.layouts.get(value.name)
        if lay is None or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if lay.axis < len(dims) and dims[lay.axis].HasField("dim_value"):
            dims[lay.axis].dim_value = int(kept[lay.ids].sum())
