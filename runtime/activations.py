"""Running the model on calibration data for the measured criteria (`analysis.criteria.CALIBRATION_CRITERIA`,
defined there): the tensors a group's consumers read, exposed and run with onnxruntime, reduced per channel.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.runtime.shapes import exposing


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


def measured_scores(model: onnx.ModelProto, analysis: ChannelAnalysis, group_ids, inputs: list[dict],
                    per_position: Callable[[np.ndarray], np.ndarray]) -> dict[int, np.ndarray]:
    """Per-channel scores of the groups that have an observable consumer input: `per_position` (a criterion of
    `analysis.criteria.MEASURED_CRITERIA`) of the values at each position of the observed tensor's channel
    axis, averaged over the positions of each channel."""
    tensors = observed_tensors(model, analysis, group_ids)
    names = sorted(set(tensors.values()))
    runs = _run(model, names, inputs)
    scores = {}
    for gid, tensor in tensors.items():
        layout = analysis.layouts[tensor]
        values = np.concatenate([np.moveaxis(run[names.index(tensor)], layout.axis, 0).reshape(len(layout.ids), -1)
                                 for run in runs], axis=1)
        scored = per_position(values)
        group = analysis.groups[gid]
        in_group = analysis.id_group[layout.ids] == gid
        channels = analysis.id_channel[layout.ids[in_group]]
        total, count = np.zeros(group.size), np.zeros(group.size)
        np.add.at(total, channels, scored[in_group])
        np.add.at(count, channels, 1)
        score = total / np.maximum(count, 1)
        score[count == 0] = score.max() if count.any() else 0.0  # channels this tensor does not show: keep
        scores[gid] = score
    return scores
