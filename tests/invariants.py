"""The design's invariants as reusable checks: zero channels, duplicate channels, identity."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_prune.analysis.channels import Group
from onnx_prune.passes.allocate import kept_count
from onnx_prune.pipeline import Prepared

ZERO_RATIO = 0.3


def run(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate(outs) for outs in zip(*(session.run(None, f) for f in feeds))]


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 2, samples: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for _ in range(samples):
        feed = {}
        for value in model.graph.input:
            if value.name in inits:
                continue
            tensor_type = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
            if tensor_type.elem_type == onnx.TensorProto.BOOL:
                feed[value.name] = np.array(True)
            else:
                feed[value.name] = rng.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-12)) for r, c in zip(reference, candidate))


def _edit_params(prepared: Prepared, edit) -> onnx.ModelProto:
    """A copy of the prepared model with `edit(member, array, node) -> array` applied to group members."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    arrays: dict[str, np.ndarray] = {}
    for group, member in edit.targets:
        array = arrays.get(member.param)
        if array is None:
            array = numpy_helper.to_array(inits[member.param]).copy()
        arrays[member.param] = edit(group, member, array, nodes[member.node])
    for name, array in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return model


def zero_channels_choice(prepared: Prepared, seed: int = 0) -> dict[int, np.ndarray]:
    """For every prunable group, the channels that uniform allocation at ZERO_RATIO removes: a random subset."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for group in prepared.analysis.prunable_groups:
        n_remove = group.size - kept_count(group.size, ZERO_RATIO, 1, int(group.frozen.sum()))
        if n_remove:
            free = np.nonzero(~group.frozen)[0]
            chosen[group.id] = np.sort(rng.choice(free, n_remove, replace=False))
    return chosen


def _keeps_value(member, node) -> bool:
    """Parameters that must not be zeroed for a zero channel to stay zero (BN variance, divisors)."""
    if node.op_type == "BatchNormalization" and member.param == node.input[4]:
        return True
    return node.op_type == "Div" and member.param == node.input[1]


def zero_model(prepared: Prepared, chosen: dict[int, np.ndarray]) -> onnx.ModelProto:
    """Producers and carriers of the chosen channels set to 0, so those channels carry exactly 0."""
    groups = {g.id: g for g in prepared.analysis.groups}

    def edit(group: Group, member, array, node):
        if _keeps_value(member, node):
            return array
        positions = member.positions[np.isin(member.channels, chosen[group.id])]
        index = [slice(None)] * array.ndim
        index[member.axis] = positions
        array[tuple(index)] = 0
        return array

    edit.targets = [(groups[g], m) for g in chosen for m in groups[g].members if m.role in ("producer", "carrier")]
    return _edit_params(prepared, edit)


def duplicate_model(prepared: Prepared, group: Group, source, copy) -> onnx.ModelProto:
    """Channel `copy` of `group` made an exact duplicate of channel `source` in every producer and carrier
    (or, for equal-length sequences, each copy[i] a duplicate of source[i])."""
    def edit(_group, member, array, _node):
        moved = np.moveaxis(array, member.axis, 0)
        for src_channel, dst_channel in zip(np.atleast_1d(source), np.atleast_1d(copy)):
            src = member.positions[member.channels == src_channel]
            dst = member.positions[member.channels == dst_channel]
            moved[dst] = moved[src]
        return array

    edit.targets = [(group, m) for m in group.members if m.role in ("producer", "carrier")]
    return _edit_params(prepared, edit)


def save_graph(path, name: str, nodes, weights, input_dims, output_dims):
    """A float model x -> ... -> y from `nodes` and `weights` (opset 17), saved at `path`; returns `path`."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_dims))], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def conv_chain(path, width: int, batch=1, hw=(32, 32)):
    """x[batch,3,H,W] -> Conv(3->width, 3x3) -> Relu -> Conv(width->4, 1x1) -> y: one prunable group of `width`
    channels, doing width * (27 + 4) * H * W MACs per sample; the same signature at any width."""
    from onnx import helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((4, width, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    return save_graph(path, "chain", nodes, weights, [batch, 3, *hw], [batch, 4, *hw])
