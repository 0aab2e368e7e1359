"""The method registry: every way of reducing channels is a Plan builder with one signature.

    method = METHODS[name]
    plan, details = method.build(MethodInput(prepared, constraints, opts, cost))

A method may ask for graph passes before the analysis (`prepare_passes`, e.g. BatchNorm folding for methods that
average filters), weight-only passes after it (`weight_passes`, e.g. RED's hashing; the analysis stays valid
because the graph does not change) and passes after the rewrite (`finish_passes`, e.g. uneven depthwise
separation).  All of them are deterministic functions of the options, so a Plan file that records the method
and its options is re-applied byte for byte by `apply`.  Every method honours every `Constraints` field, or
lists it in `refuses` with the reason, which `prune` and `plan` print as a one-line error.

Adding a method is adding a class here (or in its own module) and one entry in `METHODS`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from onnx_prune.analysis.criteria import CRITERION_NAMES, Scoring, channel_scores
from onnx_prune.errors import PruneError, TooLittleDataError
from onnx_prune.options import PruneOptions
from onnx_prune.passes.allocate import Allocator, CostModel, kept_ids, select_top
from onnx_prune.passes.constraints import Constraints, Target
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.runtime.cost import Cost


@dataclass
class MethodInput:
    """What a method reads: the prepared (normalised, analysed) model, the constraints, the options, and the
    original model's cost (None where it could not be counted)."""
    prepared: "object"                  # onnx_prune.pipeline.Prepared
    constraints: Constraints
    opts: PruneOptions
    cost: Cost | None
    _scoring: Scoring | None = field(default=None, repr=False)
    _latency: object = field(default=None, repr=False)

    @property
    def scoring(self) -> Scoring:
        if self._scoring is None:
            self._scoring = Scoring.for_prepared(self.prepared, self.opts.seed, self.opts.landmarks,
                                                 self.opts.bn_weighting, calib=self.calibration,
                                                 synthetic=self.synthetic_statistics)  # statistics lazily
        return self._scoring

    @property
    def scored(self) -> bool:
        """Has anything asked for the scoring yet (so reading its notes costs nothing)?"""
        return self._scoring is not None

    @property
    def synthetic_statistics(self) -> bool:
        """Measure channel statistics on synthetic 1/f-noise inputs where neither BatchNorm nor --calib gives
        them, only when the user asks (--synthetic-statistics): on the pretrained and Fashion-MNIST nets their
        means hurt compensation as often as they helped, and bnvar ranks by weights where variances are not
        trusted, so by default the model is never run for statistics."""
        return self.opts.synthetic_statistics

    @cached_property
    def calibration(self) -> list[dict] | None:
        """The --calib feeds (None without calibration data), loaded once for every step that reads them."""
        if not self.opts.calib:
            return None
        from onnx_prune.pipeline import calibration_inputs

        return calibration_inputs(self.prepared, self.opts)

    def statistics(self, group_ids) -> dict:
        """Per group, the mean and variance of what its consumers read (`analysis.expected`), computed once."""
        return {gid: self.scoring.group_statistics(gid) for gid in group_ids}

    @property
    def group_ids(self) -> list[int]:
        """The groups that may shrink: prunable and not excluded."""
        skip = self.constraints.excluded_groups(self.prepared.model, self.prepared.analysis)
        return [g.id for g in self.prepared.analysis.prunable_groups if g.id not in skip]

    def cost_model(self) -> CostModel | None:
        """Costs of the prepared model, as fractions of the original's (targets are the user's model's: a
        BatchNorm folded before the analysis still counts as parameters it had)."""
        if self.cost is None:
            return None
        model = CostModel.of(self.prepared.model, self.prepared.analysis,
                             {n: c.macs for n, c in self.cost.per_node.items()})
        original = self.original_cost
        return replace(model, macs=original.macs, params=original.params) if original else model

    @cached_property
    def original_cost(self) -> Cost | None:
        if self.prepared.original is None:
            return self.cost
        from onnx_prune.pipeline import _safe_cost

        return _safe_cost(self.prepared.original)

    def allocator(self, scores: dict[int, np.ndarray], cap: dict[int, int] | None = None,
                  round_to: int | str | None = None, max_ratio: float | None = None) -> Allocator:
        from onnx_prune.analysis.criteria import comparable_across_groups

        round_to = self.constraints.round_to if round_to is None else round_to
        max_ratio = self.constraints.max_ratio if max_ratio is None else max_ratio
        return Allocator(self.prepared.analysis, scores, self.cost_model(), round_to, max_ratio, cap=cap,
                         comparable=comparable_across_groups(self.opts.criterion), latency=self.latency_model())

    def counts_for(self, scores: dict[int, np.ndarray], select=None, cap: dict[int, int] | None = None
                   ) -> tuple[dict[int, int], dict]:
        """Channels each group keeps for the target under the constraints' allocation, and what the allocation
        reports: uniform and global rank by `scores`; "sensitivity" measures each group's damage curve with the
        method's own selection (`select`) and compensation, and removes least damage per MAC saved first."""
        constraints, allocator = self.constraints, self.allocator(scores, cap)
        allocation, why = self.allocation
        chosen = {"allocation": {"used": allocation, "why": why}} if why else {}
        if allocation != "sensitivity" or constraints.target.kind is None:
            return allocator.counts_for(constraints.target, allocation), chosen
        from onnx_prune.passes.sensitivity import damage_counts, synthetic_hedge

        curves, source = self.damage_curves(allocator, select)
        hedge = synthetic_hedge(source, constraints.max_ratio, constraints.target.kind)

        def counts_with(max_ratio):
            return damage_counts(self.prepared, curves, self.group_ids, constraints.target, self.cost_model(),
                                 make_allocator=lambda s: self.allocator(s, cap, max_ratio=max_ratio),
                                 extrapolate=True)
        counts = counts_with(hedge)
        missed = allocator.miss(counts, constraints.target) if hedge is not None else 0.0
        if missed > 0:
            unhedged = counts_with(None)
            if allocator.miss(unhedged, constraints.target) < missed:
                hedge, counts = None, unhedged  # the target needs deeper cuts than the hedge allows
        analysis = self.prepared.analysis
        return counts, {**chosen, "sensitivity": {
            "inputs": source, "max_removed": hedge if hedge is not None else constraints.max_ratio,
            "hedged": hedge is not None,
            "curves": {analysis.groups[g].name: c.to_dict() for g, c in sorted(curves.items())},
            "kept": {analysis.groups[g].name: f"{n}/{analysis.groups[g].size}" for g, n in sorted(counts.items())}}}

    @cached_property
    def allocation(self) -> tuple[str, str]:
        """The allocation in force and, for "auto" without data, why: for a MAC or parameter target with
        `--method prune`, sensitivity when measuring its damage curves on synthetic images is affordable
        (`passes.sensitivity.affordable`); uniform otherwise."""
        allocation = self.constraints.allocation
        if allocation != "auto":
            return allocation, ""
        if self.constraints.target.kind not in ("macs", "params") or method_named(self.opts.method).name != "prune":
            # a --ratio is a share of every group's channels; latency has its own model; merging methods were
            # measured with uniform allocation (asking for sensitivity works with every method)
            return "uniform", ""
        from onnx_prune.passes.sensitivity import affordable

        chosen = affordable(self.prepared.model, len(self.group_ids), self.cost)
        progress = self.opts.progress_printer()
        if progress is not None and chosen[0] == "sensitivity":  # announces the long step; the report says either
            progress(chosen[1])
        return chosen

    def damage_feeds(self) -> tuple[list[dict], str]:
        """(feeds, source) the damage curves are measured on: spread --calib samples ("calibration"), else
        synthetic images at the model's input normalisation where --mean/--std tell it ("synthetic")."""
        from onnx_prune.passes.sensitivity import damage_inputs
        from onnx_prune.runtime.data import Preprocessing

        opts = self.opts
        try:
            given = Preprocessing.of(mean=opts.mean, std=opts.std)
            normalization = (given.mean, given.std) if given.mean and given.std else None
            return damage_inputs(self.prepared.model, self.calibration, seed=opts.seed, normalization=normalization)
        except PruneError:
            raise
        except ValueError as err:  # e.g. an input size left open: nothing to synthesise
            raise PruneError(f"--allocation sensitivity cannot build inputs to measure damage on ({err}); "
                             "give --calib data") from None

    def damage_curves(self, allocator: Allocator, select=None) -> tuple[dict, str]:
        """Per shrinking group, the output damage of pruning it alone (`passes.sensitivity`), through this
        method's selection, compensation and the rewrite, on `damage_feeds`."""
        from onnx_prune.passes.rewrite import ApplyPlanPass
        from onnx_prune.passes.sensitivity import selection_damage_curves
        from onnx_prune.pipeline import compensated

        prepared, opts = self.prepared, self.opts
        feeds, source = self.damage_feeds()

        def pruned_model(plan: Plan):
            if opts.compensate:
                plan = compensated(self, plan)[0]
            return ApplyPlanPass(prepared.analysis, plan)(prepared.model).model

        curves = selection_damage_curves(prepared.model, allocator, self.group_ids, feeds, pruned_model,
                                         select=select, progress=opts.progress_printer())
        return curves, source

    def allocate(self, scores: dict[int, np.ndarray], select=None, cap: dict[int, int] | None = None
                 ) -> tuple[Plan, dict]:
        """The Plan for the constraints (`counts_for`), channels picked by `select` (default: the top scores)."""
        counts, details = self.counts_for(scores, select, cap)
        snap = self.constraints.target.kind != "latency"
        return self.allocator(scores, cap).plan_for_counts(counts, select, snap=snap), details

    def latency_model(self):
        """The measured latency model (cached per model and runtime), when the target or round_to="auto" needs it."""
        if self.constraints.target.kind != "latency" and self.constraints.round_to != "auto":
            return None
        if self._latency is None:
            from onnx_prune.runtime.latency_model import load_or_measure

            o = self.opts
            self._latency = load_or_measure(self.prepared.model, self.prepared.analysis, o.provider, o.threads,
                                            o.latency_batch, table_file=o.latency_table,
                                            progress=o.progress_printer())
        return self._latency


class Method(ABC):
    """Base of every method.  Subclasses set `name`, `summary` and implement `build`."""
    name = ""
    summary = ""
    refuses: dict[str, str] = {}        # Constraints field -> why this method cannot honour it
    default_target = Target(ratio=0.3)  # when the user gives none
    needs_calibration = False
    reconstructs = False                # layers are refitted on the calibration data after the rewrite

    def prepare_passes(self, opts: PruneOptions) -> list:
        """Graph passes applied (in order) to the normalised model before the analysis."""
        return []

    def weight_passes(self, opts: PruneOptions) -> list:
        """Passes that change weight values only, applied after the analysis (which stays valid)."""
        return []

    def finish_passes(self, opts: PruneOptions) -> list:
        """Passes applied to the rewritten model."""
        return []

    def check(self, constraints: Constraints, opts: PruneOptions) -> None:
        for name in constraints.given():
            if name in self.refuses:
                raise PruneError(f"--method {self.name} cannot honour {_flag(name, constraints)}: "
                                 f"{self.refuses[name]}")

    @abstractmethod
    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        """The Plan for `given` and the details the report shows."""


def _flag(name: str, constraints: Constraints) -> str:
    if name == "target":
        return "--" + {"macs": "target-macs", "params": "target-params", "latency": "target-latency",
                       "ratio": "ratio"}[constraints.target.kind]
    return "--" + name.replace("_", "-")


# --- criterion pruning (and the blended criterion)

def criterion_scores(given: MethodInput) -> dict[int, np.ndarray]:
    """Per shrinking group, the chosen criterion aggregated over the group (calibration criteria measured)."""
    from onnx_prune.analysis.criteria import CALIBRATION_CRITERIA, calibration_scores

    opts, analysis = given.opts, given.prepared.analysis
    if opts.criterion in CALIBRATION_CRITERIA:
        scores = calibration_scores(given.prepared.model, analysis, given.group_ids, given.calibration,
                                    opts.criterion)
        for gid in given.group_ids:  # groups no consumer reads visibly fall back to l2
            if gid not in scores:
                scores[gid] = channel_scores(analysis.groups[gid], given.scoring, "l2", opts.aggregate)
        return scores
    return {gid: channel_scores(analysis.groups[gid], given.scoring, opts.criterion, opts.aggregate,
                                opts.normalize) for gid in given.group_ids}


class PruneMethod(Method):
    name = "prune"
    summary = "drop the lowest-scoring channels of each group (--criterion, --aggregate; blend searches a mix)"

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        if given.opts.criterion == "blend":
            from onnx_prune.blend_search import blend_plan

            o = given.opts
            plan, report = blend_plan(given.prepared, given.opts, given.group_ids, threshold=o.blend_threshold,
                                      generations=o.generations, population=o.population, workers=o.workers,
                                      time_budget=o.time_budget, metric=o.blend_metric,
                                      blend_weights=o.blend_weights, progress=o.progress)
            return plan, {"blend": report}
        return given.allocate(criterion_scores(given))


class SimilarityMethod(Method):
    name = "similarity"
    summary = "keep one of each most similar pair of filters (exact or Nystrom neighbours)"

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        from onnx_prune.passes.similarity import SimilaritySelect

        scores = criterion_scores(given) if given.opts.criterion in CRITERION_NAMES else \
            {g: channel_scores(given.prepared.analysis.groups[g], given.scoring, "l2") for g in given.group_ids}
        select = SimilaritySelect(given.scoring, given.opts.merge_neighbours, nystrom=given.opts.criterion == "nystrom")
        return given.allocate(scores, select)


class CentripetalMethod(Method):
    name = "centripetal"
    summary = "k-means the BatchNorm-folded filters of each group; each cluster merges into one channel"

    def prepare_passes(self, opts):
        from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass

        return [FoldBatchNormPass()]  # a merge averages filter rows: exact only with BatchNorm folded in

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        from onnx_prune.passes.centripetal import CentripetalSelect

        scores = {g: channel_scores(given.prepared.analysis.groups[g], given.scoring, "l2", "domino-o")
                  for g in given.group_ids}
        select = CentripetalSelect(given.scoring, given.opts.medoid)
        plan, details = given.allocate(scores, select)
        return plan, {**details, "clusters": [select.stats[gid].to_dict() for gid in sorted(plan.groups)]}


class RedMethod(Method):
    """RED (METHODS.md §2): BatchNorm folded, weights hashed, channels identical (or within --merge-tol) in
    every producer merged, then the least salient pruned to the target, then uneven depthwise separation.

    With a target, the merge tolerance is raised (up to `max_merge_tol`) until merging alone reaches it, and
    pruning takes only what merging leaves; merging and pruning are one Plan (a merged channel that the
    pruning drops takes its whole cluster with it).  Without a target RED merges only."""
    name = "red"
    summary = "hash weights (KDE), merge identical/near-identical channels, prune the rest, separate depthwise"
    default_target = Target()

    def prepare_passes(self, opts):
        from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass

        return [FoldBatchNormPass()]

    def weight_passes(self, opts):
        from onnx_prune.passes.hashing import HashWeightsPass

        return [HashWeightsPass(opts.bandwidth, opts.per_neuron)] if opts.hash_weights else []

    def finish_passes(self, opts):
        from onnx_prune.passes.uneven_depthwise import SeparateDepthwisePass

        if not opts.separate_depthwise:
            return []
        return [SeparateDepthwisePass(provider=opts.provider, measure_latency=opts.separate_by_latency,
                                      threads=opts.threads)]

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        from onnx_prune.passes.merge import MergeSearch

        opts, constraints, analysis = given.opts, given.constraints, given.prepared.analysis
        groups = set(given.group_ids)
        criterion = opts.criterion if opts.criterion in CRITERION_NAMES else "l2"
        scores = {g: channel_scores(analysis.groups[g], given.scoring, criterion, opts.aggregate) for g in groups}
        target = constraints.target
        search_tol = target.kind is not None and opts.merge_tol < opts.max_merge_tol
        search = MergeSearch.of(analysis, given.prepared.weights(), near=opts.merge_tol > 0 or search_tol,
                                groups=groups)
        tol = opts.merge_tol
        if search_tol:
            tol = _merge_tolerance(search, given, scores, opts.merge_tol, opts.max_merge_tol)
        merged = search.plan(tol)
        cap = {g: len(p.keep) for g, p in merged.plan.groups.items()}
        allocated = {}
        if target.kind is not None:  # (a fresh MergedSelect for the sensitivity trials: it counts what it does)
            allocator = given.allocator(scores, cap)
            counts, allocated = given.counts_for(scores, MergedSelect(merged.plan, scores), cap)
        else:  # merging only: the default "size" rounding is for targets (rounding up here would undo merges)
            allocator = given.allocator(scores, cap, round_to=1 if constraints.round_to == "size" else None)
            counts = allocator.settle({g: cap.get(g, analysis.groups[g].size) for g in groups})
        select = MergedSelect(merged.plan, scores)
        plan = allocator.plan_for_counts(counts, select)
        merged_away = {analysis.groups[g].name or str(g): n for g, n in select.merged_count.items() if n}
        return plan, {**allocated, "merge": {"tol": tol, "merged": sum(merged_away.values()), "groups": merged_away},
                      "pruned": sum(select.pruned.values())}


def _merge_tolerance(search, given: MethodInput, scores, lo: float, hi: float, steps: int = 12) -> float:
    """The largest tolerance in [lo, hi] whose merging alone does not pass the target (hi where none reaches
    it; lo where even that passes it): pruning then takes the rest exactly, so the target is met within 1%
    under rounding instead of overshot by the tolerance's coarse steps."""
    allocator = given.allocator(scores)
    target = given.constraints.target

    def reached(tol: float) -> bool:
        plan = search.plan(tol).plan
        counts = {g: len(plan.groups[g].keep) if g in plan.groups else allocator.analysis.groups[g].size
                  for g in scores}
        counts = allocator.settle(counts)
        if target.kind == "ratio":
            sizes = sum(allocator.analysis.groups[g].size for g in scores)
            return 1 - sum(counts.values()) / max(sizes, 1) >= target.ratio
        return allocator.fraction(counts, target) <= target.value

    if reached(lo):
        return lo
    if not reached(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return lo


@dataclass
class MergedSelect:
    """`select(group, n_keep)` on top of a merge Plan: a group keeps its merged channels; fewer means the
    lowest-scoring merged channels go (whole clusters); more (rounding, --max-ratio) splits clusters, the
    best-scoring members leaving first."""
    merged: Plan
    scores: dict[int, np.ndarray]
    pruned: dict[int, int] = field(default_factory=dict)        # group -> channels pruned after merging
    merged_count: dict[int, int] = field(default_factory=dict)  # group -> channels merged away

    def __call__(self, group, n_keep: int) -> GroupPlan:
        from onnx_prune.passes.merge import cluster_plan

        gplan = self.merged.groups.get(group.id)
        score = self.scores[group.id]
        if gplan is None:
            self.pruned[group.id] = group.size - n_keep
            return GroupPlan(select_top(score, group.frozen, n_keep))
        labels = gplan.keep[np.argmax(gplan.fold, axis=1)]  # each channel's keeper
        if n_keep > len(gplan.keep):  # split: the best-scoring merged-away members become their own channel
            away = np.flatnonzero(labels != np.arange(group.size))
            leave = away[np.lexsort((away, -score[away]))][:n_keep - len(gplan.keep)]
            labels[leave] = leave
            gplan = cluster_plan(labels, group.frozen, average=gplan.merge is not None) or \
                GroupPlan(np.arange(group.size))
        self.merged_count[group.id] = group.size - len(gplan.keep)
        if n_keep < len(gplan.keep):  # prune whole merged channels, frozen ones never
            chosen = select_top(score[gplan.keep], group.frozen[gplan.keep], n_keep)
            self.pruned[group.id] = len(gplan.keep) - n_keep
            gplan = GroupPlan(gplan.keep[chosen], None if gplan.fold is None else gplan.fold[:, chosen],
                              None if gplan.merge is None else gplan.merge[:, chosen])
        return gplan


class ObsMethod(Method):
    """Second-order calibrated pruning (METHODS.md §6): group OBS chooses each group's channels on the
    calibration data, group by group in topological order, and the layers that read reduced channels are then
    reconstructed by ridge least squares toward the original outputs (`passes.repair`, ridge chosen by
    cross-validation over calibration sources).  By default (and with `global` or `sensitivity`) the target is
    spread by measured damage curves (each group pruned alone at a few ratios, OBS-chosen and reconstructed);
    `--allocation uniform` takes the same share of every group."""
    name = "obs"
    summary = "group OBS on --calib data: second-order channel choice, damage-curve allocation, reconstruction"
    needs_calibration = True
    reconstructs = True

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        from onnx_prune.passes.obs import obs_select
        from onnx_prune.runtime.data import feed_sources

        constraints = given.constraints
        try:
            plan, details = obs_select(given.prepared, constraints.target, given.calibration,
                                       feed_sources(given.calibration), group_ids=given.group_ids,
                                       allocation="uniform" if constraints.allocation == "uniform" else "damage",
                                       cost_model=given.cost_model(), round_to=constraints.round_to,
                                       max_ratio=constraints.max_ratio, make_allocator=given.allocator,
                                       seed=given.opts.seed, ridge=given.opts.ridge, quiet=not given.opts.progress)
        except ValueError as err:  # e.g. too few calibration feeds to fit and to check
            raise TooLittleDataError(f"--method obs: {err}; --method prune works with less data") from None
        return plan, {"obs": details}


class HashMethod(Method):
    """RED's weight hashing alone: values change, no channel goes."""
    name = "hash"
    summary = "RED's KDE weight hashing alone (weights take fewer distinct values; no channel goes)"
    default_target = Target()
    refuses = {name: "it changes weight values only and removes no channel"
               for name in ("target", "exclude", "protect_first", "round_to", "max_ratio", "allocation")}

    def prepare_passes(self, opts):
        from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass

        return [FoldBatchNormPass()]

    def weight_passes(self, opts):
        from onnx_prune.passes.hashing import HashWeightsPass

        return [HashWeightsPass(opts.bandwidth, opts.per_neuron)]

    def build(self, given: MethodInput) -> tuple[Plan, dict]:
        return Plan(), {}


METHODS: dict[str, Method] = {m.name: m for m in (PruneMethod(), SimilarityMethod(), CentripetalMethod(),
                                                   RedMethod(), ObsMethod(), HashMethod())}


AUTO = "auto"  # the default --method: obs with --calib data, prune without (`pipeline.resolved_method`)


def method_named(name: str) -> Method:
    """The method registered as `name`; "auto" not yet resolved against the data is prune."""
    if name == AUTO:
        return METHODS["prune"]
    if name not in METHODS:
        raise PruneError(f"unknown method '{name}' (choose from {', '.join([AUTO, *METHODS])})")
    return METHODS[name]
