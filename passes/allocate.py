"""How many channels each group keeps, and which: from scores and a target to a Plan.

Targets: a channel ratio, or a fraction of the original MACs or parameters to keep (reached within 1% where
the rounding allows), or a fraction of the original's measured latency (greedy on the latency model's
predictions, `runtime.latency_model`).  ``round_to="auto"``: each count becomes the fastest width at or just
below it, per the latency model.  ``round_to="size"`` (the default): a group whose width sets at least
HEAVY_GROUP_MACS MACs per sample keeps a multiple of 8 (16 from 128 channels on), a lighter one is not
rounded (`size_steps`).
Allocation: ``uniform`` (the same share from every group) or ``global`` (one ranking
of all channels, each score divided by its group's mean so that layers of different scale compare).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.errors import PruneError
from onnx_prune.passes.constraints import Target, excluded_groups  # noqa: F401 (re-exported)
from onnx_prune.passes.plan import GroupPlan, Plan

if TYPE_CHECKING:
    from onnx_prune.runtime.latency_model import LatencyModel

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TARGET_TOLERANCE = 0.01

# --round-to size.  Measured on the zoo (benchmarks/results/latency_targets/latency_round_to_cpu.md): counts
# that are not multiples of 8 make onnxruntime's CPU kernels leave their blocked layouts (8 floats wide with
# AVX2, 16 with AVX-512), and 13 of 22 pruned zoo models ran slower than their original at batch 1; with
# multiples of 8, densenet121 still did (its 128-channel groups at 120 on an AVX-512 CPU).  Rounding matters
# only where a layer's arithmetic outweighs the per-node overhead: the committed fixtures' groups set at most
# 0.16 M MACs each, the zoo's conv groups at least 1.8 M (its squeeze-excitation FCs 0.1-0.5 M), so the line
# sits at 1 M.  A heavy group rounds to the power of two nearest below an eighth of its width, kept within
# [SIZE_STEP, MAX_SIZE_STEP]: 8 below 128 channels, 16 from 128 on (a step of at most an eighth of the group);
# slots that the k groups of a grouped conv share step so that k x the count is such a multiple.
SIZE_RULE = "size"
SIZE_STEP = 8
MAX_SIZE_STEP = 16
HEAVY_GROUP_MACS = 1_000_000     # MACs per sample of the layers a group's width sets: at or above, heavy
HEAVY_GROUP_CHANNELS = 32        # where MACs cannot be counted (dynamic shapes): this wide counts as heavy


def kept_count(size: int, ratio: float, round_to: int = 1, n_frozen: int = 0) -> int:
    """Channels a group of `size` keeps at `ratio`, rounded up to a multiple of `round_to`, never zero."""
    return round_kept(size, size - math.floor(ratio * size + 1e-9), round_to, n_frozen)


def round_kept(size: int, keep: int, round_to: int | str = 1, n_frozen: int = 0) -> int:
    """`keep` within [max(frozen, 1), size], rounded up to a multiple of `round_to` ("auto": not rounded here;
    `Allocator.settle` picks a fast width with the latency model)."""
    if isinstance(round_to, int) and round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return int(min(size, max(keep, n_frozen, 1)))


def group_macs(analysis: ChannelAnalysis, cost: "CostModel") -> np.ndarray:
    """Per group, the MACs (per sample, at the cost model's shapes) of the layers whose widths it sets: a
    layer counts whole for every group along any of its weight's axes."""
    per_id = np.zeros(len(analysis.id_group))
    for macs, axes in cost.mac_terms:
        for ids in axes:
            per_id[ids] += macs / len(ids)  # each channel along the axis carries an equal share
    return np.bincount(analysis.id_group, weights=per_id, minlength=len(analysis.groups))


def heavy_step(size: int) -> int:
    """A heavy group's rounding: the power of two at or below size / 8, within [SIZE_STEP, MAX_SIZE_STEP]."""
    return max(SIZE_STEP, min(MAX_SIZE_STEP, 1 << max(0, (size // 8).bit_length() - 1)))


def replication(analysis: ChannelAnalysis) -> np.ndarray:
    """Per group, how many times its channels repeat along one weight axis: 1 for most groups, k for the
    channel slots the k groups of a grouped convolution share (RegNet's), whose tensors are k times as wide."""
    sizes = np.array([g.size for g in analysis.groups], dtype=np.int64)
    reps = np.ones(len(sizes), dtype=np.int64)
    for ids in analysis.param_ids.values():
        groups, counts = np.unique(analysis.id_group[ids], return_counts=True)
        reps[groups] = np.maximum(reps[groups], counts // np.maximum(sizes[groups], 1))
    return reps


def size_steps(analysis: ChannelAnalysis, cost: "CostModel | None") -> dict[int, int]:
    """--round-to size, per group: 1 for a light group; for a group whose width sets at least HEAVY_GROUP_MACS
    MACs per sample (without a cost model: at least HEAVY_GROUP_CHANNELS channels) the step that keeps its
    tensors' width (size x `replication`) a multiple of `heavy_step` of that width, unless no narrower count
    is such a multiple (a 6-channel group, or slots shared by an odd number of conv groups): then 1, since the
    rounding would only forbid pruning it."""
    if cost is None or not cost.macs:
        heavy = [g.size >= HEAVY_GROUP_CHANNELS for g in analysis.groups]
    else:
        heavy = list(group_macs(analysis, cost) >= HEAVY_GROUP_MACS)
    reps = replication(analysis)
    steps = {}
    for group in analysis.groups:
        k = int(reps[group.id])
        width_step = heavy_step(group.size * k)
        step = width_step // math.gcd(width_step, k)  # kept * k is then a multiple of width_step
        steps[group.id] = step if heavy[group.id] and step < group.size else 1
    return steps


def round_steps(analysis: ChannelAnalysis, cost: "CostModel | None", round_to: int | str) -> dict[int, int]:
    """The multiple each group's kept count is rounded up to: `round_to` for all (an integer), per group
    (SIZE_RULE), or 1 ("auto", where the latency model picks widths)."""
    if round_to == SIZE_RULE:
        return size_steps(analysis, cost)
    step = round_to if isinstance(round_to, int) and not isinstance(round_to, bool) else 1
    return {g.id: step for g in analysis.groups}


def mean_normalised(scores: np.ndarray, frozen: np.ndarray | None = None) -> np.ndarray:
    """`scores` over the mean |score| of the free (not frozen) channels: a unit every group shares."""
    free = ~frozen if frozen is not None else np.ones(len(scores), dtype=bool)
    mean = float(np.abs(scores[free]).mean()) if free.any() else 1.0
    return scores / (mean if mean > 0 else 1.0)


def select_top(scores: np.ndarray, frozen: np.ndarray, n_keep: int) -> np.ndarray:
    """Frozen channels plus the highest-scoring others; ties keep the lower index."""
    free = np.nonzero(~frozen)[0]
    order = free[np.lexsort((free, -scores[free]))]
    keep = np.concatenate([np.nonzero(frozen)[0], order[:n_keep - int(frozen.sum())]])
    return np.sort(keep)


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
class Allocator:
    """Turns per-group scores into a Plan for a target; `counts -> Plan` is pluggable (`select`)."""
    analysis: ChannelAnalysis
    scores: dict[int, np.ndarray]        # group id -> score per channel, for the groups that may shrink
    cost: CostModel | None = None
    round_to: int | str = 1              # a multiple for every group, SIZE_RULE (per group) or "auto"
    max_ratio: float = 1.0               # at most this share of a group goes
    cap: dict[int, int] | None = None    # group -> most channels it may keep (e.g. what merging left)
    comparable: bool = False             # scores share units across groups: global ranking uses them as they are
    latency: "LatencyModel | None" = None  # runtime.latency_model: for latency targets and round_to="auto"
    steps: dict[int, int] = field(init=False, repr=False)  # group -> its kept count's multiple (round_steps)

    def __post_init__(self):
        self.steps = round_steps(self.analysis, self.cost, self.round_to)

    def _floor(self, group) -> int:
        """Fewest channels a group may keep."""
        cap = group.size - math.floor(self.max_ratio * group.size + 1e-9)
        return max(cap, int(group.frozen.sum()), 1)

    def settle(self, counts: dict[int, int], snap: bool = True) -> dict[int, int]:
        """The counts a Plan will really keep: at least the floor (max-ratio, frozen, one), rounded up; with
        round_to="auto" (and `snap`), the fastest width the latency model finds at or just below the count."""
        out = {}
        for gid, n_keep in counts.items():
            group = self.analysis.groups[gid]
            if self.cap and gid in self.cap:
                n_keep = min(n_keep, self.cap[gid])
            floor = self._floor(group)
            n_keep = round_kept(group.size, max(n_keep, floor), self.steps[gid], int(group.frozen.sum()))
            if snap and self.round_to == "auto" and self.latency is not None and n_keep < group.size:
                n_keep = self.latency.fastest_width(gid, n_keep, n_keep, at_least=floor)
            out[gid] = n_keep
        return out

    def _step(self, gid: int) -> int:
        return self.steps[gid]

    def plan_for_counts(self, counts: dict[int, int], select=None, snap: bool = True) -> Plan:
        plan = Plan()
        for gid, n_keep in self.settle(counts, snap).items():
            if n_keep < self.analysis.groups[gid].size:
                plan.groups[gid] = (select or self._select_top)(self.analysis.groups[gid], n_keep)
        return plan

    def _select_top(self, group, n_keep: int) -> GroupPlan:
        return GroupPlan(select_top(self.scores[group.id], group.frozen, n_keep))

    # --- counts per group
    def uniform_counts(self, ratio: float) -> dict[int, int]:
        return {gid: kept_count(self.analysis.groups[gid].size, ratio) for gid in self.scores}

    def normalised(self, gid: int) -> np.ndarray:
        """A group's scores in units every group shares: as they are for a criterion that is already
        comparable across groups (`comparable`, e.g. bnvar's output error), else divided by the mean |score|
        of the group's free channels."""
        group, score = self.analysis.groups[gid], self.scores[gid]
        if self.comparable:
            return np.asarray(score, dtype=np.float64)
        return mean_normalised(score, group.frozen)

    def global_order(self) -> list[tuple[int, int]]:
        """(group, channel) removal order: lowest normalised score first, deterministic ties."""
        entries = []
        for gid in sorted(self.scores):
            group = self.analysis.groups[gid]
            free = np.nonzero(~group.frozen)[0]
            normalised = self.normalised(gid)[free]
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
    def fraction(self, counts: dict[int, int], target: Target) -> float:
        """Share of the original MACs or parameters kept with these counts (scores pick the channels; the
        cost only depends on how many of each group stay)."""
        macs, params = self.cost.evaluate(kept_ids(self.analysis, self.plan_for_counts(counts)))
        return macs / self.cost.macs if target.macs is not None else params / self.cost.params

    def miss(self, counts: dict[int, int], target: Target) -> float:
        """How far these counts land from a MAC or parameter target, beyond TARGET_TOLERANCE (0: reached; other
        targets: 0)."""
        if target.kind not in ("macs", "params") or self.cost is None:
            return 0.0
        return max(0.0, abs(self.fraction(counts, target) - target.value) - target.value * TARGET_TOLERANCE)

    def allocate(self, target: Target, allocation: str = "uniform", select=None) -> Plan:
        """The Plan for `target`: counts per group first (cheap), then `select` (default: the top scores) picks
        and folds the channels of each shrinking group once."""
        return self.plan_for_counts(self.counts_for(target, allocation), select, snap=target.kind != "latency")

    def counts_for(self, target: Target, allocation: str = "uniform") -> dict[int, int]:
        if allocation not in ("uniform", "global"):
            raise PruneError(f"unknown allocation '{allocation}' (uniform or global)")
        if target.kind is None:
            return {gid: self.analysis.groups[gid].size for gid in self.scores}
        if target.kind == "latency":
            return self.latency_counts(target.latency)
        order = self.global_order() if allocation == "global" else None
        if target.ratio is not None:
            if allocation == "uniform":
                return self.settle(self.uniform_counts(target.ratio))
            total = sum(self.analysis.groups[g].size for g in self.scores)
            return self.settle(self.global_counts(order, math.floor(target.ratio * total + 1e-9)))
        if self.cost is None or (target.macs is not None and not self.cost.macs):
            raise PruneError("cannot aim at a MAC or parameter target: the model's MACs could not be counted "
                             "(give --shape for dynamic inputs)")
        goal = target.value

        def counts_at(x):  # x in [0, 1]: how far along the removal schedule
            if allocation == "uniform":
                return self.settle(self.uniform_counts(x * 0.999))
            return self.settle(self.global_counts(order, int(round(x * len(order)))))

        lo, hi = 0.0, 1.0
        best = (abs(1.0 - goal), counts_at(0.0))
        for _ in range(40):  # bisection on a monotone (step) function
            mid = (lo + hi) / 2
            counts = counts_at(mid)
            fraction = self.fraction(counts, target)
            if abs(fraction - goal) < best[0]:
                best = (abs(fraction - goal), counts)
            if fraction > goal:
                lo = mid
            else:
                hi = mid
            if abs(fraction - goal) <= goal * TARGET_TOLERANCE / 4:
                break
        if best[0] <= goal * TARGET_TOLERANCE:
            return best[1]
        counts = self.refine(best[1], target)
        if allocation == "global" and abs(self.fraction(counts, target) - goal) > goal * TARGET_TOLERANCE:
            # coarse rounding steps passed the target and one group at a time cannot come back
            filled = self.greedy_fill(target)
            if abs(self.fraction(filled, target) - goal) < abs(self.fraction(counts, target) - goal):
                counts = filled
        return counts

    def refine(self, counts: dict[int, int], target: Target) -> dict[int, int]:
        """Step single groups by one rounding unit towards the target until it is crossed, then keep the closer
        side: what the shared schedule cannot reach when rounding (or a coarse global order) makes big steps.
        Down, the group whose next channels score lowest goes first; up, the one whose return scores highest."""
        goal = target.value
        ranked = {gid: self._normalised_ranking(gid) for gid in counts}
        fraction = self.fraction(counts, target)
        for _ in range(sum(counts.values()) + 1):
            if abs(fraction - goal) <= goal * TARGET_TOLERANCE:
                break
            down = fraction > goal
            moves = []
            for gid, n in sorted(counts.items()):
                step = self._step(gid)
                new = self.settle({gid: n - step if down else n + step}, snap=False)[gid]
                if new == n or (not down and new > n + step):
                    continue
                lo, hi = min(n, new), max(n, new)
                value = float(ranked[gid][lo:hi].mean()) if hi > lo else 0.0
                moves.append((value if down else -value, gid, new))
            if not moves:
                break
            _, gid, new = min(moves)
            stepped = {**counts, gid: new}
            after = self.fraction(stepped, target)
            if (after > goal) != down and abs(after - goal) > goal * TARGET_TOLERANCE:
                # the best-scoring step overshoots: take the best-scoring one that lands within tolerance, or
                # else the one landing closest (a smaller group, a cheaper layer)
                tolerance = goal * TARGET_TOLERANCE
                landed = []
                for value, g, n in sorted(moves):
                    a = self.fraction({**counts, g: n}, target)
                    miss = abs(a - goal)
                    landed.append((miss > tolerance, miss if miss > tolerance else 0.0, value, g, n, a))
                _, _, _, gid, new, after = min(landed, key=lambda x: x[:3])
                stepped = {**counts, gid: new}
            if (after > goal) != down:  # crossed: keep whichever side is closer
                if abs(after - goal) < abs(fraction - goal):
                    counts, fraction = stepped, after
                break
            counts, fraction = stepped, after
        return counts

    def greedy_fill(self, target: Target) -> dict[int, int]:
        """Counts from whole groups down, one rounding step at a time, always the step whose channels score
        lowest among those that do not pass the target by more than the tolerance: where rounding makes
        some steps large (8 of a 16-channel layer), the ranking's order can pass the target by far, and
        `refine`, one group at a time, cannot come back; skipping the steps that overshoot can."""
        goal = target.value
        tolerance = goal * TARGET_TOLERANCE
        counts = self.settle({gid: self.analysis.groups[gid].size for gid in self.scores}, snap=False)
        ranked = {gid: self._normalised_ranking(gid) for gid in counts}
        fraction = self.fraction(counts, target)
        while fraction > goal + tolerance:
            moves = []
            for gid, n in sorted(counts.items()):
                new = self.settle({gid: n - self._step(gid)}, snap=False)[gid]
                if new >= n:
                    continue
                after = self.fraction({**counts, gid: new}, target)
                if after < goal - tolerance:
                    continue
                moves.append((float(ranked[gid][new:n].mean()), gid, new, after))
            if not moves:
                break
            _, gid, counts[gid], fraction = min(moves)
        return counts

    def latency_counts(self, fraction: float) -> dict[int, int]:
        """Counts whose predicted latency is at most `fraction` of the original's measured one: greedy on score
        lost per predicted millisecond saved (`runtime.latency_model.latency_counts`); groups move in steps of
        round_to, or to the fastest nearby width with round_to="auto"."""
        from onnx_prune.runtime.latency_model import GroupChoice, latency_counts

        if self.latency is None:
            raise PruneError("--target-latency needs the latency model of this model (none was measured)")
        groups = {}
        for gid, score in sorted(self.scores.items()):
            group = self.analysis.groups[gid]
            cap = self.cap.get(gid) if self.cap else None
            groups[gid] = GroupChoice(group.size, self._floor(group), self.normalised(gid),
                                      group.frozen, cap)
        return self.latency.target_counts(groups, fraction, "auto" if self.round_to == "auto" else
                                          {gid: self.steps[gid] for gid in groups})

    def _normalised_ranking(self, gid: int) -> np.ndarray:
        """Group-normalised scores, frozen channels first (kept always), then the others best first: the
        channels a group of n keeps are the first n."""
        group = self.analysis.groups[gid]
        free = np.nonzero(~group.frozen)[0]
        normalised = self.normalised(gid)
        best_first = free[np.lexsort((free, -normalised[free]))]
        return np.concatenate([np.full(int(group.frozen.sum()), np.inf), normalised[best_first]])
