"""The pipeline behind the CLI and the Python API: load, analyse, score, allocate, rewrite."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis, analyze_channels
from onnx_prune.analysis.criteria import AGGREGATIONS, CRITERION_NAMES, Scoring, channel_scores
from onnx_prune.errors import PruneError
from onnx_prune.options import PruneOptions
from onnx_prune.passes.allocate import Allocator, CostModel, Target, excluded_groups
from onnx_prune.passes.normalize import NormalizeWeightsPass
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.passes.similarity import SimilaritySelect
from onnx_prune.runtime.activations import CALIBRATION_CRITERIA, calibration_scores
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
        """Initializer name -> array, decoded once per prepared model however many steps ask."""
        return self._weights

    @cached_property
    def _weights(self):
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
    details: dict = field(default_factory=dict)  # method-specific: clusters, repair, blend, RED

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "groups"}
        out["groups"] = [g.to_dict() for g in self.groups]
        return out


METHODS = ("prune", "similarity", "centripetal", "red", "hash")


@dataclass
class SweepConfig:
    label: str
    options: dict                 # `prune` keywords besides the target
    needs_calibration: bool = False  # the benchmark supplies `calib`


def sweep_configurations() -> list[SweepConfig]:
    """Every method and option set worth comparing at one target.

    Benchmarks iterate over this list, so a method appears in their tables as soon as it is added here.
    """
    configs = [SweepConfig(f"{c}/{a}", {"criterion": c, "aggregate": a})
               for c in CRITERION_NAMES for a in ("first", "domino-o", "domino-io")]
    configs += [SweepConfig("similarity-select", {"method": "similarity"}),
                SweepConfig("similarity-select+compensate", {"method": "similarity", "compensate": True})]
    configs += [SweepConfig(f"{c}/domino-o", {"criterion": c}, True) for c in CALIBRATION_CRITERIA]
    configs += [SweepConfig("blend", {"criterion": "blend", "generations": 5, "population": 10}, True),
                SweepConfig("red", {"method": "red"}),
                SweepConfig("centripetal", {"method": "centripetal"}),
                SweepConfig("centripetal+repair", {"method": "centripetal", "repair": True}, True),
                SweepConfig("l2+repair", {"criterion": "l2", "repair": True}, True)]
    return configs


def check_options(opts: PruneOptions) -> None:
    given = [n for n, v in (("--ratio", opts.ratio), ("--target-macs", opts.target_macs),
                            ("--target-params", opts.target_params)) if v is not None]
    if len(given) > 1:
        raise PruneError(f"give one target, not {' and '.join(given)}")
    if opts.ratio is not None and not 0.0 <= opts.ratio < 1.0:
        raise PruneError(f"--ratio must be in [0, 1), got {opts.ratio}")
    for name, value in (("--target-macs", opts.target_macs), ("--target-params", opts.target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise PruneError(f"{name} is the fraction to keep, in (0, 1], got {value}")
    if not 0.0 < opts.max_ratio <= 1.0:
        raise PruneError(f"--max-ratio must be in (0, 1], got {opts.max_ratio}")
    if opts.criterion in CALIBRATION_CRITERIA and not opts.calib:
        raise PruneError(f"criterion '{opts.criterion}' needs calibration data (--calib data.npz)")
    known = CRITERION_NAMES + CALIBRATION_CRITERIA + ("blend",)
    if opts.criterion not in known:
        raise PruneError(f"unknown criterion '{opts.criterion}' (choose from {', '.join(known)})")
    if opts.criterion == "blend" and opts.method != "prune":
        raise PruneError("--criterion blend chooses channels itself: use it with --method prune")
    if opts.population < 5 or opts.generations < 1 or opts.workers < 1:
        raise PruneError("blend search needs --population >= 5, --generations >= 1 and --workers >= 1")
    if opts.aggregate not in AGGREGATIONS:
        raise PruneError(f"unknown aggregation '{opts.aggregate}' (choose from {', '.join(AGGREGATIONS)})")
    if opts.method not in METHODS:
        raise PruneError(f"unknown method '{opts.method}' (choose from {', '.join(METHODS)})")
    if opts.repair and opts.method in ("red", "hash"):
        raise PruneError("--repair works with prune, similarity and centripetal; RED is data-free")
    if opts.repair and not opts.calib:
        raise PruneError("--repair refits layers on calibration data: give --calib data.npz")
    if opts.ridge < 0:
        raise PruneError(f"--ridge must be >= 0, got {opts.ridge}")
    if opts.round_to < 1:
        raise PruneError(f"--round-to must be a positive integer, got {opts.round_to}")
    if opts.landmarks < 1:
        raise PruneError(f"--landmarks must be positive, got {opts.landmarks}")


def input_stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that read a graph input directly (the first conv of a CNN)."""
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] in inputs]


def group_scores(prepared: Prepared, group_ids: list[int], opts: PruneOptions,
                 scoring: Scoring) -> dict[int, np.ndarray]:
    analysis = prepared.analysis
    if opts.criterion in CALIBRATION_CRITERIA:
        scores = calibration_scores(prepared.model, analysis, group_ids, _calibration_inputs(prepared, opts),
                                    opts.criterion)
        for gid in group_ids:  # groups no consumer reads visibly fall back to l2
            if gid not in scores:
                scores[gid] = channel_scores(analysis.groups[gid], scoring, "l2", opts.aggregate)
        return scores
    return {gid: channel_scores(analysis.groups[gid], scoring, opts.criterion, opts.aggregate, opts.normalize)
            for gid in group_ids}


def build_plan(prepared: Prepared, opts: PruneOptions, cost: Cost | None = None) -> Plan:
    """Scores for every group that may shrink, then the allocation of the target among them."""
    skip = excluded_groups(prepared.analysis, _exclusions(prepared, opts))
    group_ids = [g.id for g in prepared.analysis.prunable_groups if g.id not in skip]
    scoring = Scoring.of(prepared.model, prepared.weights(), opts.seed, opts.landmarks)
    scores = group_scores(prepared, group_ids, opts, scoring)
    cost_model = None
    if cost is not None:
        cost_model = CostModel.of(prepared.model, prepared.analysis, {n: c.macs for n, c in cost.per_node.items()})
    allocator = Allocator(prepared.analysis, scores, cost_model, opts.round_to, opts.max_ratio)
    select = None
    if opts.method == "similarity":
        select = SimilaritySelect(scoring, opts.compensate, nystrom=opts.criterion == "nystrom")
    return allocator.allocate(opts.target(), opts.allocation, select)


def with_overrides(cls, options, kwargs: dict):
    """`options` (an instance of dataclass `cls`, or its defaults) with keyword overrides; unknown ones refused."""
    opts = options or cls()
    if kwargs:
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = cls(**{**opts.__dict__, **kwargs})
    return opts


def _options(options: PruneOptions | None, kwargs: dict) -> PruneOptions:
    opts = with_overrides(PruneOptions, options, kwargs)
    check_options(opts)
    return opts


def _prunable(prepared: Prepared) -> Prepared:
    if not prepared.analysis.prunable_groups:
        reasons = sorted({r for g in prepared.analysis.groups for r in g.reasons})[:3]
        raise PruneError("nothing to prune: every channel is frozen" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return prepared


def make_plan(model: "ModelLike | Prepared", options: PruneOptions | None = None, **kwargs
              ) -> tuple[Plan, Prepared]:
    """The Plan `prune` would apply (and the prepared model it refers to), to review or edit."""
    opts = _options(options, kwargs)
    prepared = _prunable(prepare(model))
    return build_plan(prepared, opts, _safe_cost(prepared.model)), prepared


def plan_to_json(plan: Plan, prepared: Prepared) -> str:
    """The plan with each group's name and size, so that applying it to another model is caught."""
    data = json.loads(plan.to_json())
    for gid, entry in data.items():
        group = prepared.analysis.groups[int(gid)]
        entry.update(name=group.name, size=group.size)
    return json.dumps(data, indent=1)


def apply_plan(model: "ModelLike | Prepared", plan_json: str) -> tuple[onnx.ModelProto, PruneReport]:
    """Apply a reviewed (possibly edited) plan written by `plan_to_json`."""
    prepared = prepare(model)
    try:
        raw = json.loads(plan_json)
        plan = Plan.from_json(plan_json)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PruneError(f"not a valid plan: {err}") from None
    groups = prepared.analysis.groups
    for gid, entry in raw.items():
        group = groups[int(gid)] if int(gid) < len(groups) else None
        if group is None or group.name != entry.get("name") or group.size != entry.get("size"):
            raise PruneError(f"plan group {gid} ({entry.get('name')}) does not match this model")
        keep = plan.groups[int(gid)].keep
        if keep.max() >= group.size or not set(np.nonzero(group.frozen)[0]) <= set(keep.tolist()):
            raise PruneError(f"plan group {gid} ({group.name}) removes frozen or unknown channels")
    return _apply(prepared, plan, {"plan": "from file"})


def _apply(prepared: Prepared, plan: Plan, options_shown: dict, before: Cost | None = None
           ) -> tuple[onnx.ModelProto, PruneReport]:
    before = before or _safe_cost(prepared.model)
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    after = _safe_cost(pruned)
    summary = summarize(prepared, plan, before)
    report = PruneReport(
        prepared.source, options_shown,
        before.macs if before else 0, after.macs if after else 0,
        before.params if before else 0, after.params if after else 0,
        sum(g.size for g in summary.groups), sum(g.kept for g in summary.groups), summary.groups)
    return pruned, report


def prune(model: "ModelLike | Prepared", options: PruneOptions | None = None, **kwargs
          ) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove (or merge) the least important channels of every prunable group.

    Options are a `PruneOptions` or its fields as keywords, e.g. ``prune(path, ratio=0.3)`` or
    ``prune(path, target_macs=0.5, criterion="fpgm", aggregate="domino-io", allocation="global")``.
    Returns the new model (the input is not changed) and a report.  Raises PruneError for bad input.
    """
    from onnx_prune.passes.centripetal import centripetal_plan, prepare_folded  # they build on this module
    from onnx_prune.passes.repair import repair

    opts = _options(options, kwargs)
    if opts.method in ("red", "hash"):
        return _red(model, opts)
    prepared = _prunable(prepare(model))
    details: dict = {}
    if opts.method == "centripetal":  # merging averages filters: fold BatchNorm into them first
        prepared = _prunable(prepare_folded(prepared))
    before = _safe_cost(prepared.model)  # counted once: the allocation and the report both use it
    if opts.method == "centripetal":
        plan, clusters = centripetal_plan(prepared, opts.target(), medoid=opts.medoid, allocation=opts.allocation,
                                          round_to=opts.round_to, max_ratio=opts.max_ratio,
                                          exclude=tuple(_exclusions(prepared, opts)), seed=opts.seed)
        details["clusters"] = [c.to_dict() for c in clusters]
    elif opts.criterion == "blend":
        plan, details["blend"] = _blend(prepared, opts)
    else:
        plan = build_plan(prepared, opts, before)
    pruned, report = _apply(prepared, plan, dict(opts.__dict__, target=opts.target().describe()), before)
    if opts.repair:
        try:
            repaired, repair_report = repair(prepared.model, pruned, _calibration_inputs(prepared, opts),
                                             prepared.analysis, plan, ridge=opts.ridge, seed=opts.seed)
        except ValueError as err:  # e.g. too few calibration samples to fit and hold out
            raise PruneError(f"--repair: {err}") from None
        pruned = repaired
        details["repair"] = repair_report.to_dict()
    report.details.update(details)
    return pruned, report


def _red(model: "ModelLike | Prepared", opts: PruneOptions) -> tuple[onnx.ModelProto, PruneReport]:
    """RED (METHODS.md §2): hash, merge identical channels, prune the rest to a MAC target, separate."""
    from onnx_prune.red import METHOD_PRESETS, red

    prepared = prepare(model)
    target = opts.target_macs
    if target is None and opts.ratio is not None:
        raise PruneError("--method red aims at --target-macs, not --ratio (without a target it merges only)")
    reduced, details = red(prepared, **METHOD_PRESETS[opts.method], bandwidth=opts.bandwidth,
                           hash_weights=opts.hash_weights, per_neuron=opts.per_neuron, merge_tol=opts.merge_tol,
                           target_macs=target, criterion=opts.criterion if opts.criterion in CRITERION_NAMES
                           else "l2", aggregate=opts.aggregate, allocation=opts.allocation, seed=opts.seed)
    report = PruneReport(prepared.source, dict(opts.__dict__), details["macs_before"], details["macs_after"],
                         details["params_before"], details["params_after"], details["channels_before"],
                         details["channels_after"], [], {"red": details})
    return reduced, report


def _blend(prepared: Prepared, opts: PruneOptions) -> tuple[Plan, dict]:
    """Blended criteria (METHODS.md §3): cluster the criteria, search their weights by differential evolution."""
    from onnx_prune.blend_search import blend_plan

    skip = excluded_groups(prepared.analysis, _exclusions(prepared, opts))
    group_ids = [g.id for g in prepared.analysis.prunable_groups if g.id not in skip]
    return blend_plan(prepared, opts, group_ids, threshold=opts.blend_threshold, generations=opts.generations,
                      population=opts.population, workers=opts.workers, time_budget=opts.time_budget,
                      metric=opts.blend_metric, blend_weights=opts.blend_weights)


def _exclusions(prepared: Prepared, opts: PruneOptions) -> list[str]:
    return list(opts.exclude) + (input_stem_nodes(prepared.model) if opts.protect_first else [])


def _calibration_inputs(prepared: Prepared, opts: PruneOptions) -> list[dict]:
    from onnx_prune.runtime.fidelity import load_npz_inputs

    try:
        return load_npz_inputs(opts.calib, prepared.model)
    except (ValueError, OSError) as err:
        raise PruneError(f"--calib {opts.calib}: {err}") from None
