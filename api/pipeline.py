"""The pipeline behind the CLI and the Python API: load, analyse, score, allocate, rewrite."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Union

import numpy as np
import onnx

from onnx_prune.analysis.channels import ChannelAnalysis, analyze_channels
from onnx_prune.analysis.criteria import AGGREGATIONS, CALIBRATION_CRITERIA, CRITERION_NAMES
from onnx_prune.errors import PruneError, TooLittleDataError, spelled_for_caller
from onnx_prune.options import PruneOptions

API_ERRORS = spelled_for_caller(set(PruneOptions.__dataclass_fields__))
from onnx_prune.passes.constraints import ALLOCATIONS, Constraints, Target
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
    passes: tuple[str, ...] = ()  # graph passes applied before the analysis (e.g. FoldBatchNormPass)
    original: onnx.ModelProto | None = None  # the normalised model before those passes

    def weights(self) -> io.WeightReader:
        """Initializer name -> array: small tensors decoded once per prepared model, large ones on each read
        (not held for the prepared model's life); `.shape(name)` reads dims without decoding."""
        return self._weights

    @cached_property
    def _weights(self) -> io.WeightReader:
        return io.WeightReader(self.model)


def prepare(model: "ModelLike | Prepared", passes: list | tuple = ()) -> Prepared:
    """Load (if a path), check, normalise and analyse a model; `passes` (graph passes such as BatchNorm
    folding) run on the normalised model before the analysis, so it is analysed once."""
    if isinstance(model, Prepared):
        names = tuple(type(p).__name__ for p in passes)
        if model.passes == names:
            return model
        if model.passes:
            raise PruneError(f"this prepared model went through {', '.join(model.passes)}; prepare the "
                             "original again")
        return _analysed(model.model, model.source, model.external_data, passes)
    if isinstance(model, onnx.ModelProto):
        from onnx_prune.passes.base import check_model

        try:
            check_model(model)  # without serialising the weights (a 2x transient on big models)
        except (onnx.checker.ValidationError, ValueError) as err:
            raise PruneError(f"invalid ONNX model: {str(err).strip().splitlines()[0]}") from None
        source, external, proto = "<ModelProto>", False, model
    else:
        loaded = io.load(model)
        source, external, proto = str(loaded.path), loaded.external_data, loaded.model
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise PruneError(f"{source} uses opset {opset}; onnx-prune needs opset 11 or newer "
                         "(onnx.version_converter can upgrade it)")
    return _analysed(NormalizeWeightsPass()(proto).model, source, external, passes)


def _analysed(normalized: onnx.ModelProto, source: str, external: bool, passes) -> Prepared:
    model = normalized
    for graph_pass in passes:
        model = graph_pass(model).model
    return Prepared(model, analyze_channels(model, infer_shapes(model)), source, external,
                    tuple(type(p).__name__ for p in passes), normalized if passes else None)


def prepare_folded(model: "ModelLike | Prepared") -> Prepared:
    """`prepare`, with every Conv->BatchNormalization folded first (the same function, to float rounding)."""
    from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass

    return prepare(model, [FoldBatchNormPass()])


def with_weights(prepared: Prepared, passes) -> tuple[Prepared, dict]:
    """`prepared` after weight-only passes (hashing): the graph is unchanged, so the analysis still holds."""
    model, details = prepared.model, {}
    for weight_pass in passes:
        result = weight_pass(model)
        model = result.model
        details[type(weight_pass).__name__] = getattr(result, "details", {})
    if model is prepared.model:
        return prepared, details
    return Prepared(model, prepared.analysis, prepared.source, prepared.external_data, prepared.passes,
                    prepared.original), details


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
    details: dict = field(default_factory=dict)  # method-specific: clusters, merge, repair, blend, target
    validation: dict | None = None  # fidelity and accuracy against the original, when validated

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "groups"}
        out["groups"] = [g.to_dict() for g in self.groups]
        return out

    def summary(self) -> str:
        """One screen: method, cost before -> after, requested vs achieved target, fidelity and accuracy."""
        from onnx_prune.report import summary

        return summary(self)

    def __repr__(self) -> str:  # the whole report runs to thousands of characters
        return (f"PruneReport({self.source!r}, MACs {self.macs_before} -> {self.macs_after}, "
                f"channels {self.channels_before} -> {self.channels_after}; .summary() for more)")


@dataclass
class SweepConfig:
    label: str
    options: dict                 # `prune` keywords besides the target
    needs_calibration: bool = False  # the benchmark supplies `calib`
    accepts_calibration: bool = False  # data-free, and better with `calib`: benchmarks run it both ways


DEFAULT = (PruneOptions.criterion, PruneOptions.aggregate)  # (the dataclass defaults)


def sweep_configurations() -> list[SweepConfig]:
    """Every method and option set worth comparing at one target.

    Benchmarks iterate over this list, so a method appears in their tables as soon as it is added here.
    """
    configs = [SweepConfig(f"{c}/{a}", {"criterion": c, "aggregate": a}, accepts_calibration=(c, a) == DEFAULT)
               for c in CRITERION_NAMES for a in ("first", "domino-o", "domino-io")]
    # the score-based path with calibration data (the default there is obs, through --method auto)
    configs += [SweepConfig("prune", {"method": "prune"}, accepts_calibration=True),
                SweepConfig("prune/uniform", {"method": "prune", "allocation": "uniform"}, True, True)]
    configs += [SweepConfig(f"prune/{k}-steps", {"method": "prune", "steps": k}, True, True) for k in (2, 3)]
    configs += [SweepConfig("bnvar/domino-o/round-to-1", {"round_to": 1}),  # the default but unrounded
                SweepConfig("bnvar/domino-o/uniform", {"allocation": "uniform"}, accepts_calibration=True)]
    # the default reached in several prunes (`--steps`), each on the previous result
    configs += [SweepConfig(f"bnvar/domino-o/{k}-steps", {"steps": k}, accepts_calibration=True) for k in (2, 3)]
    # the same selections without expected-value compensation, to show what it buys
    configs += [SweepConfig(f"{c}/{a}/no-compensation", {"criterion": c, "aggregate": a, "compensate": False})
                for c, a in (("l1", "first"), ("l2", "domino-o"), ("random", "first"), ("bnvar", "domino-o"))
                if c in CRITERION_NAMES]
    configs += [SweepConfig(f"{c}/global", {"criterion": c, "allocation": "global"}) for c in ("l2", "bnvar")
                if c in CRITERION_NAMES]
    # measured per-group damage (synthetic inputs data-free; the calibration data when given)
    # (with calibration data the default allocation is already sensitivity: the default's calibrated rows)
    configs += [SweepConfig("bnvar/sensitivity", {"criterion": "bnvar", "allocation": "sensitivity"})]
    configs += [SweepConfig("similarity-select", {"method": "similarity"}),
                SweepConfig("similarity-select+merge-neighbours", {"method": "similarity", "merge_neighbours": True})]
    configs += [SweepConfig(f"{c}/domino-o", {"criterion": c}, True) for c in CALIBRATION_CRITERIA]
    configs += [SweepConfig("blend", {"criterion": "blend", "generations": 5, "population": 10}, True),
                SweepConfig("red", {"method": "red"}),
                SweepConfig("centripetal", {"method": "centripetal"}),
                SweepConfig("centripetal+repair", {"method": "centripetal", "repair": True}, True),
                SweepConfig("l2+repair", {"criterion": "l2", "repair": True}, True),
                SweepConfig("obs", {"method": "obs"}, True),
                SweepConfig("obs/uniform", {"method": "obs", "allocation": "uniform"}, True)]
    return configs


def check_options(opts: PruneOptions) -> None:
    from onnx_prune.methods import method_named

    given = [n for n, v in (("--ratio", opts.ratio), ("--target-macs", opts.target_macs),
                            ("--target-params", opts.target_params),
                            ("--target-latency", opts.target_latency)) if v is not None]
    if len(given) > 1:
        raise PruneError(f"give one target, not {' and '.join(given)}")
    if opts.ratio is not None and not 0.0 <= opts.ratio < 1.0:
        raise PruneError(f"--ratio must be in [0, 1), got {opts.ratio}")
    for name, value in (("--target-macs", opts.target_macs), ("--target-params", opts.target_params),
                        ("--target-latency", opts.target_latency)):
        if value is not None and not 0.0 < value <= 1.0:
            raise PruneError(f"{name} is the fraction to keep, in (0, 1], got {value}")
    if isinstance(opts.steps, bool) or not isinstance(opts.steps, int) or opts.steps < 1:
        raise PruneError(f"--steps must be a positive integer, got {opts.steps}")
    if opts.steps > 1 and opts.target_macs is None and opts.target_params is None:
        raise PruneError("--steps needs --target-macs or --target-params (each step keeps a share of the "
                         "original's MACs or parameters)")
    if not 0.0 < opts.max_ratio <= 1.0:
        raise PruneError(f"--max-ratio must be in (0, 1], got {opts.max_ratio}")
    if opts.criterion in CALIBRATION_CRITERIA and not opts.calib:
        raise PruneError(f"criterion '{opts.criterion}' needs calibration data (--calib data.npz)")
    known = CRITERION_NAMES + CALIBRATION_CRITERIA + ("blend",)
    if opts.criterion not in known:
        raise PruneError(f"unknown criterion '{opts.criterion}' (choose from {', '.join(known)})")
    if opts.criterion == "blend" and opts.method not in ("prune", "auto"):
        raise PruneError("--criterion blend chooses channels itself: use it with --method prune")
    if opts.population < 5 or opts.generations < 1 or opts.workers < 1:
        raise PruneError("blend search needs --population >= 5, --generations >= 1 and --workers >= 1")
    if opts.aggregate not in AGGREGATIONS:
        raise PruneError(f"unknown aggregation '{opts.aggregate}' (choose from {', '.join(AGGREGATIONS)})")
    if opts.allocation not in ALLOCATIONS:
        raise PruneError(f"unknown allocation '{opts.allocation}' (choose from {', '.join(ALLOCATIONS)})")
    method_named(opts.method)
    if opts.repair and opts.method in ("red", "hash"):
        raise PruneError("--repair works with prune, similarity and centripetal; RED is data-free")
    if opts.repair and not opts.calib:
        raise PruneError("--repair refits layers on calibration data: give --calib data.npz")
    if opts.ridge < 0:
        raise PruneError(f"--ridge must be >= 0, got {opts.ridge}")
    if opts.restore_variance and not opts.compensate:
        raise PruneError("--restore-variance scales kept channels and needs compensation to put their means "
                         "back: drop --no-compensate")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) or opts.seed < 0:
        raise PruneError(f"--seed must be a non-negative integer, got {opts.seed}")
    for name, value in opts.__dict__.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PruneError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if opts.round_to not in ("size", "auto") and (isinstance(opts.round_to, bool)
                                                  or not isinstance(opts.round_to, int) or opts.round_to < 1):
        raise PruneError(f"--round-to must be a positive integer, size or auto, got {opts.round_to}")
    if opts.latency_batch < 1 or (opts.threads is not None and opts.threads < 1):
        raise PruneError("--latency-batch and --threads must be positive")
    if opts.min_speedup is not None and not opts.min_speedup > 0:
        raise PruneError(f"--min-speedup must be positive, got {opts.min_speedup}")
    if opts.landmarks is not None and opts.landmarks < 1:
        raise PruneError(f"--landmarks must be positive, got {opts.landmarks}")
    if not opts.bandwidth > 0:
        raise PruneError(f"--bandwidth must be positive, got {opts.bandwidth}")
    if not 0 <= opts.merge_tol <= opts.max_merge_tol:
        raise PruneError(f"--merge-tol must be in [0, --max-merge-tol={opts.max_merge_tol}], got {opts.merge_tol}")


def constraints_of(opts: PruneOptions) -> Constraints:
    """The options' constraints, with the method's default target where the user gave none."""
    from onnx_prune.methods import method_named

    given = [Target(ratio=opts.ratio), Target(macs=opts.target_macs), Target(params=opts.target_params),
             Target(latency=opts.target_latency)]
    target = next((t for t in given if t.kind is not None), method_named(opts.method).default_target)
    round_to = opts.round_to
    if target.kind == "latency" and round_to == PruneOptions.round_to:  # not set: auto goes with latency targets
        round_to = "auto"
    allocation = opts.allocation
    if allocation == "auto" and opts.calib:  # measured damage where data says what matters; without data
        allocation = "sensitivity"  # MethodInput.allocation decides by the cost of measuring on synthetic images
    return Constraints(target, tuple(opts.exclude), opts.protect_first, round_to, opts.max_ratio, allocation)


def with_overrides(cls, options, kwargs: dict):
    """`options` (an instance of dataclass `cls`, or its defaults) with keyword overrides; unknown ones refused."""
    opts = options or cls()
    if kwargs:
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise PruneError(f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = cls(**{**opts.__dict__, **kwargs})
    return opts


def resolved_method(opts: PruneOptions, plan: bool = False) -> str:
    """What --method auto means for these options: obs (second-order selection and reconstruction) with --calib
    data -- measured far ahead of select-then-recalibrate (MobileNetV2 at 80% of MACs 0.600 against 0.367; the
    Fashion-MNIST nets at 50% 0.95-0.97 against 0.09-0.81, README) -- unless --repair or another criterion asks
    for selection by scores, or a plan file is wanted (obs's reconstruction is beyond what a plan records);
    prune otherwise."""
    from onnx_prune.methods import AUTO

    if opts.method != AUTO:
        return opts.method
    by_scores = opts.repair or opts.criterion != PruneOptions.criterion
    return "obs" if opts.calib and not by_scores and not plan else "prune"


def _options(options: PruneOptions | None, kwargs: dict, plan: bool = False) -> PruneOptions:
    opts = with_overrides(PruneOptions, options, kwargs)
    if isinstance(opts.exclude, str):  # one name, not a sequence of characters
        opts = PruneOptions(**{**opts.__dict__, "exclude": [opts.exclude]})
    opts = replace(opts, method=resolved_method(opts, plan))
    check_options(opts)
    return opts


def _prunable(prepared: Prepared) -> Prepared:
    if not prepared.analysis.prunable_groups:
        reasons = sorted({r for g in prepared.analysis.groups for r in g.reasons})[:3]
        raise PruneError("nothing to prune: every channel is frozen" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return prepared


@dataclass
class Recipe:
    """Everything that turns the original model into the pruned one: the method and its options (they name
    the passes before and after), the Plan over the prepared model's groups, and the prepared model itself."""
    method: str
    opts: PruneOptions
    plan: Plan
    prepared: Prepared                  # after the method's graph and weight passes
    cost: Cost | None                   # the original's
    details: dict
    calibration: list[dict] | None = None  # the --calib feeds, loaded once


def build_recipe(model: "ModelLike | Prepared", opts: PruneOptions) -> Recipe:
    """Run the method's passes and Plan builder: everything `prune` does before the rewrite."""
    from onnx_prune.methods import MethodInput, method_named

    method = method_named(opts.method)
    constraints = constraints_of(opts)
    method.check(constraints, opts)
    if method.needs_calibration and not opts.calib:
        raise PruneError(f"--method {method.name} needs calibration data (--calib)")
    prepared = _prunable(prepare(model, method.prepare_passes(opts)))
    prepared, pass_details = with_weights(prepared, method.weight_passes(opts))
    given = MethodInput(prepared, constraints, opts, _safe_cost(prepared.model))
    plan, details = method.build(given)
    details = {**pass_details, **details}
    if opts.compensate and plan.groups:
        plan, details["compensation"] = compensated(given, plan)
    if given.scored and given.scoring.notes:  # e.g. the Nystrom fit per layer, where statistics came from
        details["scoring"] = given.scoring.notes
    return Recipe(method.name, opts, plan, prepared, given.original_cost, details,
                  given.calibration if opts.calib else None)


def exact_only(stats):
    """Statistics keeping only what is exact whatever the inputs: deterministic channels (all-zero producer
    rows carry their bias); the rest unknown, so compensation leaves them alone."""
    from dataclasses import replace

    mean = np.where(stats.deterministic, stats.mean, np.nan)
    reads = {node: replace(read, mean=np.where(read.deterministic, read.mean, np.nan))
             for node, read in stats.reads.items()}
    return replace(stats, mean=mean, reads=reads)


def compensated(given, plan: Plan) -> tuple[Plan, dict]:
    """`plan` with each removed channel replaced by its expected value (`passes.compensate`), and a summary."""
    from onnx_prune.passes.compensate import compensate, compensation_summary, restore_variance

    # propagated: pushed analytically from the normalised inputs through the linear layers (BN-fused exports).
    # For plain pruning they helped (fused MobileNetV2 at 90% of MACs, bnvar: 0.276 -> 0.462 top-1 agreement);
    # for merges, whose merged-channel mean is a first-order estimate on top, they hurt (RED on the Fashion-MNIST
    # resnet20 at 90%: 89.8% -> 79.7% accuracy), so merging plans use BatchNorm/measured means only.  Means
    # measured on synthetic noise images hurt either way and are opt-in.
    synthetic = ("synthetic",) if given.opts.synthetic_statistics else ()
    trusted_pruning = ("bn", "propagated", "measured", "constant") + synthetic
    trusted_merging = ("bn", "measured", "constant") + synthetic
    stats = {}
    for gid, st in given.statistics(sorted(plan.groups)).items():
        if st is None:
            continue
        merging = plan.groups[gid].merges
        stats[gid] = st if st.source in (trusted_merging if merging else trusted_pruning) else exact_only(st)
    scales = {}
    if given.opts.restore_variance:  # before compensate, which moves the scaled channels' means back
        plan, scales = restore_variance(given.prepared, plan, stats, bn_after=given.scoring.bn_after)
    plan = compensate(given.prepared, plan, stats)
    summary = compensation_summary(plan, stats, scales)
    return plan, {str(gid): entry for gid, entry in summary.items()}


def method_plan(prepared: Prepared, opts: PruneOptions, cost: Cost | None = None) -> tuple[Plan, dict]:
    """`opts.method`'s Plan (and details) for a model already prepared with the method's passes (for
    benchmarks and tests that compare selections on one prepared model)."""
    from onnx_prune.methods import MethodInput, method_named

    check_options(opts)
    method = method_named(opts.method)
    constraints = constraints_of(opts)
    method.check(constraints, opts)
    return method.build(MethodInput(prepared, constraints, opts, cost))


def build_plan(prepared: Prepared, opts: PruneOptions, cost: Cost | None = None) -> Plan:
    return method_plan(prepared, opts, cost)[0]


@API_ERRORS
def make_plan(model: "ModelLike | Prepared", options: PruneOptions | None = None, **kwargs
              ) -> tuple[Plan, Prepared]:
    """The Plan `prune` would apply (and the prepared model it refers to), to review or edit."""
    recipe = _plan_recipe(model, _options(options, kwargs, plan=True))
    return recipe.plan, recipe.prepared


def _plan_recipe(model, opts: PruneOptions) -> Recipe:
    from onnx_prune.methods import method_named

    if method_named(opts.method).reconstructs:
        raise PruneError(f"--method {opts.method} reconstructs weights after the rewrite, beyond what a plan "
                         "records; prune directly (a plan file cannot hold it)")
    if opts.repair:
        raise PruneError("--repair refits weights beyond what a plan records; prune directly with --repair "
                         "(a plan file cannot hold it)")
    if opts.steps > 1:
        raise PruneError("--steps prunes several times, each on the previous result: one plan cannot hold it; "
                         "prune directly")
    return build_recipe(model, opts)


@API_ERRORS
def plan_file(model: "ModelLike | Prepared", options: PruneOptions | None = None, **kwargs) -> str:
    """The plan `prune` would apply, as JSON to review, edit, and re-apply with `apply_plan`."""
    return recipe_to_json(_plan_recipe(model, _options(options, kwargs, plan=True)))


def recipe_to_json(recipe: Recipe) -> str:
    """Method, options and per-group plan, with each group's name and size so that applying it to another
    model is caught."""
    groups = json.loads(recipe.plan.to_json())
    for gid, entry in groups.items():
        group = recipe.prepared.analysis.groups[int(gid)]
        entry.update(name=group.name, size=group.size)
    options = {k: v for k, v in recipe.opts.__dict__.items()}
    return json.dumps({"format": "onnx-prune plan 2", "method": recipe.method, "options": options,
                       "groups": groups}, indent=1)


@API_ERRORS
def apply_plan(model: "ModelLike | Prepared", plan_json: str) -> tuple[onnx.ModelProto, PruneReport]:
    """Apply a reviewed (possibly edited) plan written by `plan_file`: the recorded method's passes run again
    (deterministic), then the plan, so an unedited plan gives the same bytes as `prune`."""
    from onnx_prune.methods import method_named

    try:
        raw = json.loads(plan_json)
        if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict):
            raise ValueError("no 'groups' object")
        opts = with_overrides(PruneOptions, None, raw.get("options") or {})
        method = method_named(raw.get("method", "prune"))
        plan = Plan.from_json(json.dumps(raw["groups"]))
    except (ValueError, KeyError, TypeError, AttributeError, PruneError) as err:
        raise PruneError(f"not a valid plan: {err}") from None
    prepared = _prunable(prepare(model, method.prepare_passes(opts)))
    prepared, _ = with_weights(prepared, method.weight_passes(opts))
    groups = prepared.analysis.groups
    for gid, entry in raw["groups"].items():
        group = groups[int(gid)] if 0 <= int(gid) < len(groups) else None
        if group is None or group.name != entry.get("name") or group.size != entry.get("size"):
            raise PruneError(f"plan group {gid} ({entry.get('name')}) does not match this model")
        gplan = plan.groups[int(gid)]
        keep = gplan.keep
        if keep.max() >= group.size or not set(np.nonzero(group.frozen)[0]) <= set(keep.tolist()):
            raise PruneError(f"plan group {gid} ({group.name}) removes frozen or unknown channels")
        for name in ("fold", "merge", "shift"):
            matrix = getattr(gplan, name, None)
            if matrix is None:
                continue
            if matrix.shape[0] != group.size or not np.isfinite(matrix).all():
                raise PruneError(f"plan group {gid} ({group.name}): '{name}' must have {group.size} finite rows")
    recipe = Recipe(method.name, opts, plan, prepared, _safe_cost(prepared.original or prepared.model),
                    {"plan": "from file"})
    pruned, report = finish_recipe(recipe)
    return recalibrated(recipe, pruned, report), report


def finish_recipe(recipe: Recipe) -> tuple[onnx.ModelProto, PruneReport]:
    """Rewrite, the method's finishing passes, and the report."""
    from onnx_prune.methods import method_named

    prepared, plan, before = recipe.prepared, recipe.plan, recipe.cost
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    details = dict(recipe.details)
    for finish in method_named(recipe.method).finish_passes(recipe.opts):
        result = finish(pruned)
        pruned = result.model
        details[type(finish).__name__] = getattr(result, "details", {})
    after = _safe_cost(pruned)
    summary = summarize(prepared, plan, before)
    constraints = constraints_of(recipe.opts)
    details["target"] = _target_record(constraints.target, before, after, summary)
    if constraints.target.kind == "latency":  # requested against measured (and predicted) latency
        from onnx_prune.runtime.latency_model import latency_record

        details["target"].update(latency_record(prepared.model, prepared.analysis, pruned, plan, recipe.opts))
    report = PruneReport(
        prepared.source, dict(recipe.opts.__dict__, target=constraints.target.describe()),
        before.macs if before else 0, after.macs if after else 0,
        before.params if before else 0, after.params if after else 0,
        sum(g.size for g in summary.groups), sum(g.kept for g in summary.groups), summary.groups, details)
    return pruned, report


def _target_record(target: Target, before: Cost | None, after: Cost | None, summary) -> dict:
    """Requested against achieved, in the target's own unit."""
    record = {"requested": target.describe(), "kind": target.kind, "value": target.value}
    if before and after and before.macs:
        record["macs_kept"] = after.macs / before.macs
    if before and after and before.params:
        record["params_kept"] = after.params / before.params
    prunable = sum(g.size - g.frozen for g in summary.groups)  # frozen channels were never on offer
    removed = sum(g.size - g.kept for g in summary.groups)
    record["channels_removed"] = removed / prunable if prunable else 0.0
    achieved = {"macs": record.get("macs_kept"), "params": record.get("params_kept"),
                "ratio": record["channels_removed"]}.get(target.kind)
    if achieved is not None:
        record["achieved"] = achieved
    return record


@API_ERRORS
def prune(model: "ModelLike | Prepared", options: PruneOptions | None = None, **kwargs
          ) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove (or merge) the least important channels of every prunable group.

    Options are a `PruneOptions` or its fields as keywords, e.g. ``prune(path, ratio=0.3)`` or
    ``prune(path, target_macs=0.5, criterion="fpgm", aggregate="domino-io", allocation="global")``.
    Every method goes the same way: its passes, its Plan (`onnx_prune.methods`), the one rewrite, then repair
    when asked.  Returns the new model (the input is not changed) and a report.  Raises PruneError for bad
    input.
    """
    from onnx_prune.methods import method_named

    requested = with_overrides(PruneOptions, options, kwargs)
    opts = _options(requested, {})
    if opts.steps > 1:
        return _stepwise(model, opts)
    auto_with_data = requested.method == "auto" and opts.calib
    try:
        recipe = build_recipe(model, opts)
    except TooLittleDataError as err:
        if not auto_with_data:
            raise
        opts = replace(opts, method="prune")  # e.g. too few calibration feeds for obs: select and recalibrate
        recipe = build_recipe(model, opts)
        recipe.details["method"] = {"auto": "prune", "why": f"obs refused: {err}"}
    else:
        if auto_with_data:  # without data auto is plainly prune: nothing to report
            recipe.details["method"] = {"auto": opts.method, "why": "second-order selection and reconstruction"
                                        if opts.method == "obs" else "--repair or a --criterion asks for scores"}
    pruned, report = finish_recipe(recipe)
    if opts.repair or method_named(opts.method).reconstructs:
        from onnx_prune.passes.repair import repair
        from onnx_prune.runtime.data import feed_sources

        prepared = recipe.prepared
        try:
            repaired, repair_report = repair(prepared.model, pruned, recipe.calibration, prepared.analysis,
                                             recipe.plan, ridge=opts.ridge, seed=opts.seed,
                                             sources=feed_sources(recipe.calibration))
        except ValueError as err:  # e.g. too few calibration samples to fit and hold out
            raise PruneError(f"--repair: {err}") from None
        pruned = repaired
        report.details["repair"] = repair_report  # the pass's details: plain data
    pruned = recalibrated(recipe, pruned, report)
    if recipe.prepared.source != "<ModelProto>":
        io.remember_source(pruned, recipe.prepared.source)  # save(pruned, that file) is then refused
    return pruned, report


def step_shares(final: float, steps: int) -> list[float]:
    """The share of the original kept after each of `steps` prunes: evenly spaced from 1 down to `final`."""
    return [1.0 - (1.0 - final) * (i + 1) / steps for i in range(steps)]


def _stepwise(model: "ModelLike | Prepared", opts: PruneOptions) -> tuple[onnx.ModelProto, PruneReport]:
    """`opts.steps` prunes in a row, step i keeping `step_shares(...)[i]` of the original's MACs (or
    parameters): each step prunes the previous result with everything measured again on it.  The report is the
    last step's, counted against the original, with every step in ``details["steps"]``."""
    kind = "macs" if opts.target_macs is not None else "params"
    final = opts.target_macs if kind == "macs" else opts.target_params
    current, first, records, report = model, None, [], None
    progress = opts.progress_printer()
    for step, share in enumerate(step_shares(final, opts.steps)):
        before = getattr(report, f"{kind}_after") if report else None
        base = getattr(first, f"{kind}_before") if first else None
        relative = share if report is None else share * base / max(before, 1)
        if relative >= 1.0:  # an earlier step already went this far
            continue
        if progress is not None:
            progress(f"step {step + 1}/{opts.steps}: keep {share:.1%} of the original's "
                     f"{'MACs' if kind == 'macs' else 'parameters'}")
        step_opts = replace(opts, steps=1, target_macs=relative if kind == "macs" else None,
                            target_params=relative if kind == "params" else None)
        current, report = prune(current, step_opts)
        first = first or report
        records.append({"keep": share, "kind": kind, "target": report.details["target"],
                        "macs_after": report.macs_after, "params_after": report.params_after})
    report.options = dict(opts.__dict__, target=Target(**{kind: final}).describe())
    report.source, report.macs_before, report.params_before = first.source, first.macs_before, first.params_before
    report.channels_before = first.channels_before
    target = {k: v for k, v in report.details["target"].items() if k != "channels_removed"}  # the last step's
    target = report.details["target"] = {**target, "requested": Target(**{kind: final}).describe(), "value": final}
    for name in ("macs", "params"):
        if getattr(first, f"{name}_before"):
            target[f"{name}_kept"] = getattr(report, f"{name}_after") / getattr(first, f"{name}_before")
    target["achieved"] = target[f"{kind}_kept"]
    report.details["steps"] = records
    if first.source != "<ModelProto>":
        io.remember_source(current, first.source)  # save(result, that file) is then refused
    return current, report


def recalibrated(recipe: Recipe, pruned: onnx.ModelProto, report: PruneReport) -> onnx.ModelProto:
    """With --calib (and not --no-recalibrate): `pruned` with each layer's output channels given back the
    original's mean and spread (`passes.recalibrate`), when that lowers the held-out damage."""
    opts = recipe.opts
    if not opts.calib or not opts.recalibrate or not recipe.plan.groups:
        return pruned
    from onnx_prune.passes.recalibrate import RecalibratePass, channel_map
    from onnx_prune.runtime.data import feed_sources

    feeds = recipe.calibration if recipe.calibration is not None else calibration_inputs(recipe.prepared, opts)
    if len(feeds) < 2:
        report.details["recalibration"] = {"recalibrated": 0, "reason": "fewer than 2 calibration feeds"}
        return pruned
    mapping = channel_map(recipe.prepared.model, recipe.prepared.analysis, recipe.plan)
    result = RecalibratePass(recipe.prepared.model, mapping, feeds, sources=feed_sources(feeds),
                             progress=opts.progress_printer())(pruned)
    report.details["recalibration"] = result.details
    return result.model


def calibration_inputs(prepared: Prepared, opts: PruneOptions) -> list[dict]:
    """The --calib data as feeds: an .npz/.npy (N samples along the batch axis), an image folder (with the
    preprocessing options) or a data-loader script (`runtime.data`); a `runtime.data.Feeds`, carrying each
    sample's source id where the data tells it (for held-out checks by source)."""
    from onnx_prune.runtime.data import load_feeds, preprocessing_options

    try:
        return load_feeds(opts.calib, prepared.model, **preprocessing_options(opts))
    except (PruneError, ValueError, OSError) as err:
        message = str(err)
        raise PruneError(message if str(opts.calib) in message else f"--calib {opts.calib}: {message}") from None
