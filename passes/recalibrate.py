"""Recalibration: with calibration data, give every layer's output channels back the mean and spread they had.

Pruning shifts the statistics of everything downstream: a layer that lost input channels produces outputs with
a different mean and a smaller variance, the next activation clips them differently, and the errors compound
over the depth of the network (issue 15: single groups pruned by 10% keep a median 0.84 top-1 agreement, all
of them together 0.5).  Re-estimating BatchNorm statistics on a few hundred images is the standard cure
(EagleEye's adaptive BatchNorm); most deployed exports have their BatchNorm folded away, so here the same
correction is a per-channel affine map folded into each Conv/Gemm's weights and bias:

    y_c  ->  a_c (y_c - mu_pruned_c) + mu_original_c,     a_c = sigma_original_c / sigma_pruned_c

with the statistics of the original model's same channel (the plan says which original channel each kept one
is) measured on the calibration feeds.  Two parameters per channel, estimated from every spatial position of
every image: far too few to overfit a few hundred images, unlike a least-squares refit.  Layers are corrected
in graph order, each measured after those before it were corrected (one forward pass per layer).  Graph
outputs (a classifier's logits) are left alone.

The correction is kept only when it lowers the output damage (`passes.sensitivity.output_damage`) on held-out
calibration samples -- whole calibration sources when the loader tells them -- otherwise the model is returned
unchanged with the reason in the details.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.analysis.layers import weight_axes
from onnx_prune.passes.base import Pass, PassResult, copy_model

LAYERS = ("Conv", "Gemm")
SCALE_LIMITS = (0.25, 4.0)  # a_c is clipped: a channel whose spread collapsed is not blown up without bound
MIN_STD = 1e-6


@dataclass
class ChannelMoments:
    mean: np.ndarray
    std: np.ndarray


def channel_map(original: onnx.ModelProto, analysis, plan) -> dict[str, np.ndarray]:
    """Conv/Gemm node name -> for each output channel of its pruned version, the original channel it is.  Nodes
    whose output channels were merged (a fold or merge matrix: no one original channel) are left out."""
    from onnx_prune.passes.allocate import kept_ids

    kept = kept_ids(analysis, plan)
    merged = {gid for gid, gplan in plan.groups.items()
              if getattr(gplan, "fold", None) is not None or getattr(gplan, "merge", None) is not None}
    dims = {t.name: len(t.dims) for t in original.graph.initializer}
    out = {}
    for node in original.graph.node:
        if node.op_type not in LAYERS or len(node.input) < 2 or node.input[1] not in dims:
            continue
        out_axis, _ = weight_axes(node, dims[node.input[1]])
        ids = analysis.param_ids.get((node.input[1], out_axis))
        if ids is None:
            continue
        if merged & set(np.unique(analysis.id_group[ids]).tolist()):
            continue
        out[node.name] = np.nonzero(kept[ids])[0]
    return out


def up_to(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` computing only what `tensors` need, with them as its outputs and only the weights those
    nodes read (a layer's statistics then cost the part of the network before it, not all of it)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, stack = set(), list(tensors)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
    kept = [node for node in model.graph.node if id(node) in needed]
    read = {name for node in kept for name in node.input}
    truncated = onnx.ModelProto()
    truncated.CopyFrom(model)
    del truncated.graph.node[:]
    truncated.graph.node.extend(kept)
    del truncated.graph.output[:]
    truncated.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    dropped = {t.name for t in truncated.graph.initializer if t.name not in read}
    weights = [t for t in truncated.graph.initializer if t.name in read]
    inputs = [i for i in truncated.graph.input if i.name not in dropped]  # (old exports list weights as inputs)
    del truncated.graph.initializer[:], truncated.graph.input[:]
    truncated.graph.initializer.extend(weights)
    truncated.graph.input.extend(inputs)
    return truncated


def output_moments(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> dict[str, ChannelMoments]:
    """Per tensor, the mean and standard deviation of each channel (axis 1) over the samples and positions of
    `feeds`."""
    from onnx_prune.analysis.expected import channel_moments
    from onnx_prune.runtime.sessions import make_session

    moments = channel_moments(make_session(up_to(model, tensors)), tensors, feeds, dict.fromkeys(tensors, 1))
    return {t: ChannelMoments(mean, np.sqrt(var)) for t, (mean, var) in moments.items()}


def affine_correction(target: ChannelMoments, current: ChannelMoments, spread: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a * current + b matching the target's mean and spread per channel; a = 1 where either
    spread is ~0 (then only the mean moves), or everywhere without `spread`."""
    live = (current.std > MIN_STD) & (target.std > MIN_STD) & spread
    scale = np.where(live, target.std / np.where(live, current.std, 1.0), 1.0)
    scale = np.clip(scale, *SCALE_LIMITS)
    return scale, target.mean - scale * current.mean


def _apply(model: onnx.ModelProto, node: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> None:
    """Fold y -> scale * y + shift (per output channel) into `node`'s weight and bias, in place."""
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits[node.input[1]])
    out_axis, _ = weight_axes(node, weight.ndim)
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(
        (weight * scale.reshape(shape)).astype(weight.dtype), node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(inits[node.input[2]])
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(
            (bias * scale + shift).astype(bias.dtype), node.input[2]))
    else:
        name = f"{node.name or node.output[0]}_recalibrated_bias"
        model.graph.initializer.append(numpy_helper.from_array(shift.astype(weight.dtype), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name


class RecalibratePass(Pass):
    """Match each kept channel's output mean and spread to the original's on calibration data (module doc).

    requires: the pruned model's Conv/Gemm nodes keep the original's names; `feeds` has at least 2 feeds (one
    held out).  ensures (besides the base checks): the graph is unchanged but for weights and biases."""

    def __init__(self, original: onnx.ModelProto, mapping: dict[str, np.ndarray], feeds: list[dict],
                 sources=None, held: int = 64, spread: bool = True, progress=None):
        self.original, self.mapping, self.feeds = original, mapping, feeds
        self.sources, self.held, self.spread, self.progress = sources, held, spread, progress

    def requires(self, model: onnx.ModelProto) -> None:
        super().requires(model)
        if len(self.feeds) < 2:
            from onnx_prune.passes.base import PreconditionError

            raise PreconditionError("recalibration needs at least 2 calibration feeds (to fit and to check)")

    def call(self, model: onnx.ModelProto) -> PassResult:
        from onnx_prune.passes.obs import split_by_source
        from onnx_prune.passes.sensitivity import output_damage
        from onnx_prune.runtime.calibration import sample_count
        from onnx_prune.runtime.data import split_summary
        from onnx_prune.runtime.sessions import make_session

        fit, held = split_by_source(self.feeds, self.sources, self.held)
        graph_outputs = {o.name for o in model.graph.output}
        nodes = [n for n in model.graph.node if n.name in self.mapping and n.output[0] not in graph_outputs
                 and n.op_type in LAYERS and self._fits(model, n)]
        tensors = [n.output[0] for n in nodes]
        if not tensors:
            return PassResult(model, False, details={"recalibrated": 0, "reason": "no layer to recalibrate"})
        original_output = {n.name: n.output[0] for n in self.original.graph.node if n.name in self.mapping}
        target = output_moments(self.original, [original_output[n.name] for n in nodes], fit)
        corrected = copy_model(model)
        by_name = {n.name: n for n in corrected.graph.node}
        # in graph (topological) order, each layer measured after every layer before it was corrected:
        # correcting all at once overshoots (a layer's correction is computed against inputs that then change)
        for step, node in enumerate(nodes):
            keep = self.mapping[node.name]
            original = target[original_output[node.name]]
            current = output_moments(corrected, [node.output[0]], fit)[node.output[0]]
            scale, shift = affine_correction(ChannelMoments(original.mean[keep], original.std[keep]), current,
                                             self.spread)
            _apply(corrected, by_name[node.name], scale, shift)
            if self.progress is not None:
                self.progress(f"recalibrate: layer {step + 1}/{len(nodes)} {node.name}")
        reference = [make_session(self.original).run(None, feed) for feed in held]

        def damage(candidate: onnx.ModelProto) -> float:
            session = make_session(candidate)
            return float(np.mean([output_damage(r, session.run(None, f)) for r, f in zip(reference, held)]))

        before, after = damage(model), damage(corrected)
        details = {"layers": len(nodes), "held_out_samples": sum(sample_count(f) for f in held),
                   **split_summary(self.feeds, self.sources, held),
                   "held_out_damage_before": before, "held_out_damage_after": after}
        if not after < before:
            return PassResult(model, False, details={**details, "recalibrated": 0,
                                                     "reason": "did not lower the held-out damage: kept as pruned"})
        return PassResult(corrected, True, details={**details, "recalibrated": len(nodes)})

    def _fits(self, model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
        """The pruned node's output count equals its channel map's (else the map does not describe it)."""
        weights = {t.name: t for t in model.graph.initializer}
        weight = weights.get(node.input[1])
        if weight is None:
            return False
        out_axis, _ = weight_axes(node, len(weight.dims))
        return weight.dims[out_axis] == len(self.mapping[node.name])

