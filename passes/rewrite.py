"""The one rewrite: apply a Plan to every weight slice, shape constant and attribute its groups own.

Requires: `analysis` was built from this very model (normalised).  Ensures: onnx.checker passes, graph outputs
keep their shapes, the input model is not mutated.  Pruning and merging differ only in the Plan's `fold`.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.passes.allocate import kept_ids
from onnx_prune.passes.base import PassResult, copy_model, output_dims
from onnx_prune.passes.plan import Plan

DENSE_FOLD_LIMIT = 4_000_000  # fold matrices larger than this are built sparse


class ApplyPlanPass:
    def __init__(self, analysis: ChannelAnalysis, plan: Plan):
        self.analysis = analysis
        self.plan = plan

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        sizes = {g.id: g.size for g in self.analysis.groups}
        if not self.plan.removes_anything(sizes):
            return PassResult(copy_model(model), False)
        kept = kept_ids(self.analysis, self.plan)
        out = copy_model(model)
        graph = out.graph
        inits = {t.name: t for t in graph.initializer}
        for param, edits in _param_edits(self.analysis).items():
            if all(kept[ids].all() and not self._combines(ids, role) for _, ids, role in edits):
                continue
            array = numpy_helper.to_array(inits[param])
            for axis, ids, role in edits:
                if self._combines(ids, role):
                    array = _combine(array, axis, ids, self.analysis, self.plan, kept, _matrix_for(role))
                elif not kept[ids].all():
                    array = np.take(array, np.nonzero(kept[ids])[0], axis=axis)
            inits[param].CopyFrom(numpy_helper.from_array(array, param))
        _apply_shape_edits(out, self.analysis, kept)
        _update_value_info(graph, self.analysis, kept)
        before = output_dims(model)
        onnx.checker.check_model(out)
        if output_dims(out) != before:  # pragma: no cover - outputs are frozen by analysis
            raise AssertionError("rewrite changed the graph outputs")
        return PassResult(out, True)

    def _combines(self, ids: np.ndarray, role: str) -> bool:
        """Does some group behind these positions mix channels (fold for consumers, merge for the rest)?"""
        attribute = _matrix_for(role)
        plans = (self.plan.groups.get(int(g)) for g in np.unique(self.analysis.id_group[ids]))
        return any(p is not None and getattr(p, attribute) is not None for p in plans)


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
    readers = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
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
