"""How many channels each group keeps, and which: from scores and a target to a Plan.

Targets: a channel ratio, or a fraction of the original MACs or parameters to keep (reached within 1% where
the rounding allows).  Allocation: ``uniform`` (the same share from every group) or ``global`` (one ranking
of all channels, each score divided by its group's mean so that layers of different scale compare).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import onnx

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.errors import PruneError
from onnx_prune.passes.plan import GroupPlan, Plan

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TARGET_TOLERANCE = 0.01


def kept_count(size: int, ratio: float, round_to: int = 1, n_frozen: int = 0) -> int:
    """Channels a group of `size` keeps at `ratio`, rounded up to a multiple of `round_to`, never zero."""
    return round_kept(size, size - math.floor(ratio * size + 1e-9), round_to, n_frozen)


def round_kept(size: int, keep: int, round_to: int = 1, n_frozen: int = 0) -> int:
    if round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return int(min(size, max(keep, n_frozen, 1)))


def select_top(scores: np.ndarray, frozen: np.ndarray, n_keep: int) -> np.ndarray:
    """Frozen channels plus the highest-scoring others; ties keep the lower index."""
    free = np.nonzero(~frozen)[0]
    order = free[np.lexsort((free, -scores[free]))]
    keep = np.concatenate([np.nonzero(frozen)[0], order[:n_keep - int(frozen.sum())]])
    return np.sort(keep)


def excluded_groups(analysis: ChannelAnalysis, patterns: list[str]) -> set[int]:
    """Groups whose channels a node matching one of `patterns` writes (shell-style wildcards).

    Only producers and carriers count: excluding a layer keeps its output channels, not its input."""
    known = set(analysis.node_ops)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in known):
            raise PruneError(f"--exclude {pattern}: no node of the model has that name")
    return {g.id for g in analysis.groups
            if any(fnmatchcase(m.node, p) for m in g.members if m.role != "consumer" for p in patterns)}


def kept_ids(analysis: ChannelAnalysis, plan: Plan) -> np.ndarray:
    """Bool per global channel id: does its channel survive the plan?"""
    masks = []
    for group in analysis.groups:
        mask = np.ones(group.size, dtype=bool)
        if group.id in plan.groups:
            mask[:] = False
            mask[plan.groups[group.id].keep] = True
        masks.append(mask)
    offsets = np.cumsum([0] + [g.size for g in analysis.groups])
    flat = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return flat[offsets[analysis.id_group] + analysis.id_channel]


@dataclass
class CostModel:
    """MACs and parameters of the pruned model without building it.

    A Conv/Gemm/MatMul costs MACs proportional to its weight's extent along each axis, and a weight's size is
    the product of its extents, so both scale with the kept share of every (weight, axis) a group owns.
    """
    macs: int
    params: int
    mac_terms: list[tuple[int, list[np.ndarray]]]
    param_terms: list[tuple[int, list[np.ndarray]]]

    @classmethod
    def of(cls, model: onnx.ModelProto, analysis: ChannelAnalysis, node_macs: dict[str, int]) -> "CostModel":
        axes_of: dict[str, list[np.ndarray]] = {}
        for (param, _axis), ids in sorted(analysis.param_ids.items()):
            axes_of.setdefault(param, []).append(ids)
        mac_terms = [(node_macs.get(n.name, 0), axes_of.get(n.input[1], [])) for n in model.graph.node
                     if n.op_type in MAC_OPS and len(n.input) > 1]
        float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                       onnx.TensorProto.DOUBLE)
        param_terms = [(int(np.prod(t.dims)), axes_of.get(t.name, [])) for t in model.graph.initializer
                       if t.data_type in float_types]
        return cls(sum(m for m, _ in mac_terms), sum(p for p, _ in param_terms), mac_terms, param_terms)

    @staticmethod
    def _total(terms, kept: np.ndarray) -> float:
        return sum(size * math.prod(float(kept[ids].mean()) for ids in axes) for size, axes in terms)

    def evaluate(self, kept: np.ndarray) -> tuple[float, float]:
        """(MACs, params) when only the channels with kept[id] survive."""
        return self._total(self.mac_terms, kept), self._total(self.param_terms, kept)


@dataclass
class Target:
    ratio: float | None = None          # share of channels to remove
    macs: float | None = None           # fraction of MACs to keep
    params: float | None = None         # fraction of parameters to keep

    def describe(self) -> str:
        if self.macs is not None:
            return f"keep {self.macs:.0%} of MACs"
        if self.params is not None:
            return f"keep {self.params:.0%} of parameters"
        return f"remove {self.ratio:.0%} of channels"


@dataclass
class Allocator:
    """Turns per-group scores into a Plan for a target; `counts -> Plan` is pluggable (`select`)."""
    analysis: ChannelAnalysis
    scores: dict[int, np.ndarray]        # group id -> score per channel, for the groups that may shrink
    cost: CostModel | None = None
    round_to: int = 1
    max_ratio: float = 1.0               # at most this share of a group goes

    def _floor(self, group) -> int:
        """Fewest channels a group may keep."""
        cap = group.size - math.floor(self.max_ratio * group.size + 1e-9)
        return max(cap, int(group.frozen.sum()), 1)

    def plan_for_counts(self, counts: dict[int, int], select=None) -> Plan:
        plan = Plan()
        for gid, n_keep in counts.items():
            group = self.analysis.groups[gid]
            n_keep = round_kept(group.size, max(n_keep, self._floor(group)), self.round_to, int(group.frozen.sum()))
            if n_keep < group.size:
                plan.groups[gid] = (select or self._select_top)(group, n_keep)
        return plan

    def _select_top(self, group, n_keep: int) -> GroupPlan:
        return GroupPlan(select_top(self.scores[group.id], group.frozen, n_keep))

    # --- counts per group
    def uniform_counts(self, ratio: float) -> dict[int, int]:
        return {gid: kept_count(self.analysis.groups[gid].size, ratio) for gid in self.scores}

    def global_order(self) -> list[tuple[int, int]]:
        """(group, channel) removal order: lowest group-normalised score first, deterministic ties."""
        entries = []
        for gid, score in sorted(self.scores.items()):
            group = self.analysis.groups[gid]
            free = np.nonzero(~group.frozen)[0]
            mean = float(np.abs(score[free]).mean()) if len(free) else 1.0
            normalised = score[free] / (mean if mean > 0 else 1.0)
            ranked = free[np.lexsort((free, normalised))]
            limit = group.size - self._floor(group)
            entries += [(float(normalised[np.searchsorted(free, c)]), gid, int(c)) for c in ranked[:limit]]
        entries.sort()
        return [(gid, c) for _, gid, c in entries]

    def global_counts(self, order: list[tuple[int, int]], n_remove: int) -> dict[int, int]:
        removed = np.zeros(len(self.analysis.groups), dtype=np.int64)
        for gid, _ in order[:n_remove]:
            removed[gid] += 1
        return {gid: self.analysis.groups[gid].size - int(removed[gid]) for gid in self.scores}

    # --- targets
    def _fraction(self, plan: Plan, target: Target) -> float:
        macs, params = self.cost.evaluate(kept_ids(self.analysis, plan))
        return macs / self.cost.macs if target.macs is not None else params / self.cost.params

    def allocate(self, target: Target, allocation: str = "uniform", select=None) -> Plan:
        if allocation not in ("uniform", "global"):
            raise PruneError(f"unknown allocation '{allocation}' (uniform or global)")
        order = self.global_order() if allocation == "global" else None
        if target.ratio is not None:
            if allocation == "uniform":
                return self.plan_for_counts(self.uniform_counts(target.ratio), select)
            total = sum(self.analysis.groups[g].size for g in self.scores)
            return self.plan_for_counts(self.global_counts(order, math.floor(target.ratio * total + 1e-9)), select)
        if self.cost is None or (target.macs is not None and not self.cost.macs):
            raise PruneError("cannot aim at a MAC or parameter target: the model's MACs could not be counted "
                             "(give --shape for dynamic inputs)")
        goal = target.macs if target.macs is not None else target.params

        def plan_at(x):  # x in [0, 1]: how far along the removal schedule
            if allocation == "uniform":
                return self.plan_for_counts(self.uniform_counts(x * 0.999), select)
            return self.plan_for_counts(self.global_counts(order, int(round(x * len(order)))), select)

        lo, hi = 0.0, 1.0
        best = (abs(1.0 - goal), plan_at(0.0))
        for _ in range(40):  # bisection on a monotone (step) function
            mid = (lo + hi) / 2
            plan = plan_at(mid)
            fraction = self._fraction(plan, target)
            if abs(fraction - goal) < best[0]:
                best = (abs(fraction - goal), plan)
            if fraction > goal:
                lo = mid
            else:
                hi = mid
            if abs(fraction - goal) <= goal * TARGET_TOLERANCE / 4:
                break
        return best[1]
