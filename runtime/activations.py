"""Channel statistics from calibration data: the tensors a group's consumers read, run with onnxruntime.

- ``activation``: mean |activation| per channel (high = keep);
- ``apoz``: 1 - average percentage of zeros per channel (a channel that is mostly 0 after a Relu goes first).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.runtime.shapes import exposing

CALIBRATION_CRITERIA = ("activation", "apoz")


def observed_tensors(model: onnx.ModelProto, analysis: ChannelAnalysis, group_ids) -> dict[int, str]:
    """For each group, one tensor a consumer of the group reads whose channels all belong to the group."""
    inputs_of = {n.name: n.input[0] for n in model.graph.node}
    chosen = {}
    for gid in group_ids:
        for member in analysis.groups[gid].by_role("consumer"):
            tensor = inputs_of.get(member.node)
            layout = analysis.layouts.get(tensor)
            if layout is not None and np.any(analysis.id_group[layout.ids] == gid):
                chosen[gid] = tensor
                break
    return chosen


def probe_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A CPU session of `model` with the intermediate `tensors` exposed as extra graph outputs."""
    return ort.InferenceSession(exposing(model, tensors).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, tensors: list[str], inputs: list[dict]) -> list[list[np.ndarray]]:
    session = probe_session(model, tensors)
    return [session.run(tensors, feed) for feed in inputs]


def calibration_scores(model: onnx.ModelProto, analysis: ChannelAnalysis, group_ids, inputs: list[dict],
                       criterion: str) -> dict[int, np.ndarray]:
    """Per-channel scores of the groups that have an observable consumer input."""
    tensors = observed_tensors(model, analysis, group_ids)
    names = sorted(set(tensors.values()))
    runs = _run(model, names, inputs)
    scores = {}
    for gid, tensor in tensors.items():
        layout = analysis.layouts[tensor]
        values = np.concatenate([np.moveaxis(run[names.index(tensor)], layout.axis, 0).reshape(len(layout.ids), -1)
                                 for run in runs], axis=1)
        per_position = np.abs(values).mean(axis=1) if criterion == "activation" else 1 - (values == 0).mean(axis=1)
        group = analysis.groups[gid]
        in_group = analysis.id_group[layout.ids] == gid
        channels = analysis.id_channel[layout.ids[in_group]]
        total, count = np.zeros(group.size), np.zeros(group.size)
        np.add.at(total, channels, per_position[in_group])
        np.add.at(count, channels, 1)
        score = total / np.maximum(count, 1)
        score[count == 0] = score.max() if count.any() else 0.0  # channels this tensor does not show: keep
        scores[gid] = score
    return scores
