"""RED (METHODS.md §2), data-free: hash the weights, merge the channels that became identical, optionally prune
the least salient remaining channels to a MAC target, and separate convs whose kernels repeat.

    model, report = red("in.onnx")                                  # hash + merge duplicates + separate
    model, report = red("in.onnx", target_macs=0.5)                 # ... to 50 % of the MACs
    model, report = red("in.onnx", merge=False, separate_depthwise=False)   # hashing alone ("method hash")

Order: BatchNorms are folded into their convs first (merging and hashing then see the filters the runtime
uses), then hashing (`passes.hashing`), merging (`passes.red`), pruning (`Allocator` over `channel_scores`,
the target counted against the original model's MACs) and last the uneven depthwise separation
(`passes.uneven_depthwise`), whose MAC savings the target does not count on.

With a MAC target, merging comes first and pruning takes only what merging leaves: by default
(``merge_to_target``) the merge tolerance is raised by bisection, up to ``max_merge_tol``, until merging
near-duplicates alone reaches the target.  Merging sums a removed channel's consumer columns into its
near-twin's instead of dropping them, and on the trained ResNet-20 it kept far more accuracy than L1/L2
pruning at the same MACs (benchmarks/results/red_table.md).  ``merge_to_target=False`` merges at
``merge_tol`` only and prunes the rest by saliency.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnx_prune.analysis.criteria import AGGREGATIONS, CRITERION_NAMES, Scoring, channel_scores
from onnx_prune.errors import PruneError
from onnx_prune.passes.allocate import Allocator, CostModel, Target, kept_ids
from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass
from onnx_prune.passes.hashing import DEFAULT_BANDWIDTH, HashWeightsPass
from onnx_prune.passes.red import MergeSearch
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.passes.uneven_depthwise import SeparateDepthwisePass
from onnx_prune.pipeline import ModelLike, Prepared, _safe_cost, prepare, with_overrides
from onnx_prune.runtime.cost import count_cost

TOL_STEPS = 12  # bisection steps of the merge-tolerance search (to 1 / 2^12 ~ 2e-4)


@dataclass
class RedOptions:
    """Everything `red` can be told."""
    bandwidth: float = DEFAULT_BANDWIDTH  # KDE bandwidth (scipy bw_method scalar): larger = fewer distinct values
    hash_weights: bool = True             # hash Conv/Gemm/MatMul weights before merging
    per_neuron: bool = False              # one KDE per output neuron instead of per layer
    hash_biases: bool = False             # hash bias vectors too (each as a layer of its own)
    merge: bool = True                    # merge identical (or near-identical) channels
    merge_tol: float = 0.0                # relative L2 distance up to which channels merge; 0 = exact only
    target_macs: float | None = None      # then prune to this fraction of the original MACs
    merge_to_target: bool = True          # with a target: raise merge_tol (up to max_merge_tol) until merging
    max_merge_tol: float = 1.0            # alone reaches it, and prune only what merging cannot
    criterion: str = "l2"                 # saliency for that prune (analysis.criteria)
    aggregate: str = "domino-o"
    allocation: str = "uniform"
    separate_depthwise: bool = True       # uneven depthwise separation where it lowers MACs and latency
    provider: str = "cpu"                 # where separation latency is measured
    check_latency: bool = True            # False: separate on MACs alone
    seed: int = 0

    def check(self) -> None:
        if not self.bandwidth > 0:
            raise PruneError(f"--bandwidth must be positive, got {self.bandwidth}")
        if not 0 <= self.merge_tol <= self.max_merge_tol:
            raise PruneError(f"--merge-tol must be in [0, --max-merge-tol={self.max_merge_tol}], got {self.merge_tol}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise PruneError(f"--target-macs is the fraction to keep, in (0, 1], got {self.target_macs}")
        if self.criterion not in CRITERION_NAMES:
            raise PruneError(f"unknown criterion '{self.criterion}' (choose from {', '.join(CRITERION_NAMES)})")
        if self.aggregate not in AGGREGATIONS:
            raise PruneError(f"unknown aggregation '{self.aggregate}' (choose from {', '.join(AGGREGATIONS)})")


# `--method` presets: RED as a whole, and hashing alone
METHOD_PRESETS = {"red": {}, "hash": {"merge": False, "separate_depthwise": False}}


def red(model: "ModelLike | Prepared", options: RedOptions | None = None, **kwargs) -> tuple[onnx.ModelProto, dict]:
    """Hash, merge, (prune), separate; returns the new model (the input is not changed) and a JSON-able report:
    MACs/params/channels before and after, distinct values per hashed layer, channels merged per group,
    the prune step, and the separation decision (MACs, latency before/after) per candidate conv."""
    opts = with_overrides(RedOptions, options, kwargs)
    opts.check()
    prepared = prepare(model)
    before = _safe_cost(prepared.model)
    report = {"source": prepared.source, "options": dict(opts.__dict__),
              "macs_before": before.macs if before else 0, "params_before": before.params if before else 0,
              "channels_before": sum(g.size for g in prepared.analysis.groups),
              "hash": None, "merge": None, "prune": None, "separate": None}
    current = FoldBatchNormPass()(prepared.model).model
    if opts.hash_weights:
        current, layers = HashWeightsPass(opts.bandwidth, opts.per_neuron, opts.hash_biases).hash(current)
        report["hash"] = {"layers": [layer.to_dict() for layer in layers],
                          "distinct_before": sum(layer.before for layer in layers),
                          "distinct_after": sum(layer.after for layer in layers)}
    if opts.merge:
        folded = prepare(current)
        search_tol = opts.merge_to_target and opts.target_macs is not None and before is not None
        search = MergeSearch.of(folded.analysis, folded.weights(), near=opts.merge_tol > 0 or search_tol)
        tol = _tolerance_for(search, folded, before.macs, opts) if search_tol else opts.merge_tol
        summary = search.plan(tol)
        current = ApplyPlanPass(folded.analysis, summary.plan)(folded.model).model
        report["merge"] = {"merged": summary.total, "tol": tol, "groups": summary.merged}
    if opts.target_macs is not None:
        current, report["prune"] = _prune_to(current, opts, before.macs if before else 0)
    if opts.separate_depthwise:
        current, decisions = SeparateDepthwisePass(opts.provider, opts.check_latency).separate(current)
        report["separate"] = [d.to_dict() for d in decisions]
    after = _safe_cost(current)
    removed = (report["merge"] or {}).get("merged", 0) + (report["prune"] or {}).get("removed", 0)
    report.update(macs_after=after.macs if after else 0, params_after=after.params if after else 0,
                  channels_after=report["channels_before"] - removed)
    return current, report


def _tolerance_for(search: MergeSearch, folded: Prepared, original_macs: int, opts: RedOptions) -> float:
    """The smallest merge tolerance in [merge_tol, max_merge_tol] whose merging alone keeps at most
    `target_macs` of the original MACs (max_merge_tol where none does); bisection on the cost model."""
    cost = count_cost(folded.model)
    cost_model = CostModel.of(folded.model, folded.analysis, {n: c.macs for n, c in cost.per_node.items()})

    def fraction(tol: float) -> float:
        return cost_model.evaluate(kept_ids(folded.analysis, search.plan(tol).plan))[0] / original_macs

    lo, hi = opts.merge_tol, opts.max_merge_tol
    if fraction(lo) <= opts.target_macs:
        return lo
    if fraction(hi) > opts.target_macs:
        return hi
    for _ in range(TOL_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) > opts.target_macs else (lo, mid)
    return hi


def _prune_to(model: onnx.ModelProto, opts: RedOptions, original_macs: int) -> tuple[onnx.ModelProto, dict]:
    """Prune the least salient channels until the model has `opts.target_macs` of `original_macs`."""
    prepared = prepare(model)
    cost = _safe_cost(prepared.model)
    if cost is None or not original_macs:
        raise PruneError("cannot aim at a MAC target: the model's MACs could not be counted")
    goal = opts.target_macs * original_macs / cost.macs  # the fraction of the merged model to keep
    step = {"target_macs": opts.target_macs, "macs_before_prune": cost.macs, "removed": 0}
    if goal >= 1.0:
        return model, step
    analysis = prepared.analysis
    scoring = Scoring.of(prepared.model, prepared.weights(), opts.seed)
    scores = {g.id: channel_scores(g, scoring, opts.criterion, opts.aggregate) for g in analysis.prunable_groups}
    cost_model = CostModel.of(prepared.model, analysis, {n: c.macs for n, c in cost.per_node.items()})
    plan = Allocator(analysis, scores, cost_model).allocate(Target(macs=goal), opts.allocation)
    step["removed"] = sum(analysis.groups[g].size - len(p.keep) for g, p in plan.groups.items())
    return ApplyPlanPass(analysis, plan)(prepared.model).model, step
