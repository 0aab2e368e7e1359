"""The pipeline behind the CLI and the Python API: load, analyse, score, allocate, rewrite."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis, analyze_channels
from onnx_prune.analysis.criteria import CRITERIA
from onnx_prune.errors import PruneError
from onnx_prune.passes.allocate import excluded_groups, uniform_plan
from onnx_prune.passes.normalize import NormalizeWeightsPass
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.runtime import io
from onnx_prune.runtime.cost import Cost, count_cost
from onnx_prune.runtime.shapes import infer_shapes

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


@dataclass
class Prepared:
    """A model ready for analysis: normalised, with its shapes and channel groups."""
    model: onnx.ModelProto
    analysis: ChannelAnalysis
    source: str
    external_data: bool = False

    def weights(self):
        inits = {t.name: t for t in self.model.graph.initializer}

        @lru_cache(maxsize=None)
        def read(name: str) -> np.ndarray:
            return numpy_helper.to_array(inits[name])
        return read


def prepare(model: "ModelLike | Prepared") -> Prepared:
    """Load (if a path), check, normalise and analyse a model."""
    if isinstance(model, Prepared):
        return model
    if isinstance(model, onnx.ModelProto):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as err:
            raise PruneError(f"invalid ONNX model: {str(err).strip().splitlines()[0]}") from None
        source, external, proto = "<ModelProto>", False, model
    else:
        loaded = io.load(model)
        source, external, proto = str(loaded.path), loaded.external_data, loaded.model
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise PruneError(f"{source} uses opset {opset}; onnx-prune needs opset 11 or newer "
                         "(onnx.version_converter can upgrade it)")
    normalized = NormalizeWeightsPass()(proto).model
    return Prepared(normalized, analyze_channels(normalized, infer_shapes(normalized)), source, external)


@dataclass
class GroupSummary:
    id: int
    name: str
    size: int
    kept: int
    frozen: int
    producers: list[str]
    consumers: list[str]
    mac_share: float
    reasons: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AnalysisReport:
    source: str
    groups: list[GroupSummary]
    macs: int
    params: int
    prunable_mac_share: float  # share of Conv MACs whose output channels can be pruned
    frozen_reasons: dict[str, int] = field(default_factory=dict)  # reason -> channels frozen by it

    def to_dict(self) -> dict:
        return {"source": self.source, "macs": self.macs, "params": self.params,
                "prunable_mac_share": self.prunable_mac_share, "frozen_reasons": self.frozen_reasons,
                "groups": [g.to_dict() for g in self.groups]}


def _safe_cost(model: onnx.ModelProto) -> Cost | None:
    try:
        return count_cost(model)
    except ValueError:  # dynamic spatial dims: costs need the user's --shape (validation issue)
        return None


def summarize(prepared: Prepared, plan: Plan | None = None, cost: Cost | None = None) -> AnalysisReport:
    analysis = prepared.analysis
    cost = cost or _safe_cost(prepared.model)
    node_macs = {name: c.macs for name, c in cost.per_node.items()} if cost else {}
    total = sum(node_macs.values()) or 1
    summaries = []
    reasons: dict[str, int] = {}
    prunable_conv_nodes: set[str] = set()
    for group in analysis.groups:
        producers = group.nodes("producer")
        macs = sum(node_macs.get(n, 0) for n in producers)
        kept = len(plan.groups[group.id].keep) if plan and group.id in plan.groups else group.size
        summaries.append(GroupSummary(group.id, group.name, group.size, kept, int(group.frozen.sum()),
                                      producers, group.nodes("consumer"), macs / total, group.reasons))
        for reason in group.reasons:
            reasons[reason] = reasons.get(reason, 0) + int(group.frozen.sum())
        if group.prunable and group.size > 1:  # depthwise convs carry their group: they shrink with it too
            shrinking = {m.node for m in group.members if m.role in ("producer", "carrier")}
            prunable_conv_nodes |= {n for n in shrinking if analysis.node_ops.get(n) == "Conv"}
    conv_macs = sum(m for n, m in node_macs.items() if analysis.node_ops.get(n) == "Conv") or 1
    prunable_conv_macs = sum(node_macs.get(n, 0) for n in prunable_conv_nodes)
    return AnalysisReport(prepared.source, summaries, cost.macs if cost else 0, cost.params if cost else 0,
                          prunable_conv_macs / conv_macs, reasons)


def analyze(model: ModelLike) -> AnalysisReport:
    """Channel groups of a model: sizes, MAC shares, what is frozen and why."""
    return summarize(prepare(model))


@dataclass
class PruneReport:
    source: str
    options: dict
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channels_before: int
    channels_after: int
    groups: list[GroupSummary]

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "groups"}
        out["groups"] = [g.to_dict() for g in self.groups]
        return out


def check_options(ratio: float, criterion: str, round_to: int) -> None:
    if not 0.0 <= ratio < 1.0:
        raise PruneError(f"--ratio must be in [0, 1), got {ratio}")
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion '{criterion}' (choose from {', '.join(sorted(CRITERIA))})")
    if round_to < 1:
        raise PruneError(f"--round-to must be a positive integer, got {round_to}")


def input_stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that read a graph input directly (the first conv of a CNN)."""
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] in inputs]


def build_plan(prepared: Prepared, ratio: float, criterion: str, round_to: int,
               exclude: list[str], protect_first: bool) -> Plan:
    patterns = list(exclude) + (input_stem_nodes(prepared.model) if protect_first else [])
    skip = excluded_groups(prepared.analysis, patterns)
    weights = prepared.weights()
    score = CRITERIA[criterion]
    scores = {g.id: score(g, weights) for g in prepared.analysis.prunable_groups if g.id not in skip}
    return uniform_plan(prepared.analysis, scores, ratio, round_to, skip)


def prune(model: ModelLike, ratio: float = 0.3, criterion: str = "l2", round_to: int = 1,
          exclude: list[str] = (), seed: int = 0, protect_first: bool = False,
          ) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove the lowest-scoring `ratio` of channels of every prunable group.

    Returns the pruned model (the input is not changed) and a report.  Raises PruneError for bad input.
    """
    check_options(ratio, criterion, round_to)
    prepared = prepare(model)
    if not prepared.analysis.prunable_groups:
        reasons = sorted({r for g in prepared.analysis.groups for r in g.reasons})[:3]
        raise PruneError("nothing to prune: every channel is frozen" + (f" ({'; '.join(reasons)})" if reasons else ""))
    plan = build_plan(prepared, ratio, criterion, round_to, list(exclude), protect_first)
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    before, after = _safe_cost(prepared.model), _safe_cost(pruned)
    summary = summarize(prepared, plan, before)
    options = {"ratio": ratio, "criterion": criterion, "round_to": round_to, "exclude": list(exclude),
               "seed": seed, "protect_first": protect_first}
    report = PruneReport(
        prepared.source, options,
        before.macs if before else 0, after.macs if after else 0,
        before.params if before else 0, after.params if after else 0,
        sum(g.size for g in summary.groups), sum(g.kept for g in summary.groups), summary.groups)
    return pruned, report
