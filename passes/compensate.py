"""Expected-activation compensation: a removed channel acts as its mean instead of as zero.

`compensate(prepared, plan, stats)` returns the plan with `shift` set for every group it reduces; the one
rewrite (`ApplyPlanPass`) folds ``sum_c W_cons[:, c] * shift[c]`` into each consumer's bias.

What the consumers lose.  A consumer computes ``sum_c W[:, c] x_c``.  After the rewrite it computes
``sum_k W'[:, k] x'_k`` with ``W' = W fold`` (C x K) and ``x'_k`` the kept channel k, whose producer rows are
``sum_d merge[d, k] row_d`` (merge = I[:, keep] when rows are kept as they are).  The expected difference is

    E[sum_c W[:, c] x_c] - E[sum_k W'[:, k] x'_k] = sum_c W[:, c] (m_c - sum_k fold[c, k] m'_k)

so ``shift[c] = m_c - (fold m')[c]``, with ``m`` the channel means the consumers read (`GroupStatistics`).
For plain pruning that is m_c for every removed channel and exactly 0 for kept ones.  For a merge, ``m'_k``
(the mean of the merged channel) is taken as ``sum_d merge[d, k] m_d``: exact for the linear layer, and for
identical channels (RED) the shift is then 0, so exact merges stay exact; through a nonlinearity between the
producer and the consumer it is a first-order estimate (the merged pre-activation's mean is exact, the
activation's curvature is ignored).  A channel whose mean is unknown (NaN: no consumer reads it, or nothing
could be measured) gets no shift, and neither does one folded onto a kept channel of unknown mean.

Consumers that read the group at different points (a residual stream: x1, x1 + x2, ...) get their own vector in
`consumer_shift` where it differs from the group's (that of the first consumer by name).

Means estimated without BatchNorm statistics or data ("propagated", "synthetic") are used only where the
consumer reads an activation's output (`_trusted`).
"""
from __future__ import annotations

import numpy as np

from onnx_prune.analysis.expected import GroupStatistics
from onnx_prune.passes.plan import GroupPlan, Plan


def _matrices(gplan: GroupPlan, size: int) -> tuple[np.ndarray, np.ndarray]:
    identity = np.eye(size)[:, gplan.keep]
    fold = identity if gplan.fold is None else np.asarray(gplan.fold, dtype=np.float64)
    merge = identity if gplan.merge is None else np.asarray(gplan.merge, dtype=np.float64)
    return fold, merge


def lost_means(mean: np.ndarray, fold: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """Per channel c: m_c - sum_k fold[c, k] m'_k, m'_k = sum_d merge[d, k] m_d (0 where a mean is unknown)."""
    known = np.isfinite(mean)
    m = np.where(known, mean, 0.0)
    carried = merge.T @ m
    carried_known = ((merge != 0) & ~known[:, None]).sum(axis=0) == 0
    reaches_unknown = ((fold != 0) & ~carried_known[None, :]).any(axis=1)
    shift = m - fold @ carried
    return np.where(known & ~reaches_unknown, shift, 0.0)


ESTIMATED = ("propagated", "synthetic")


def _trusted(read) -> np.ndarray:
    """The means of a consumer read worth compensating: all of them, except a data-free estimate (no BatchNorm,
    no calibration data) of a tensor that no activation produced -- a linear stream's mean is the small sum of
    many estimated terms, mostly their error (on MobileNetV2 compensating those lowered agreement).
    Deterministic channels are exact whatever the source."""
    if read.source in ESTIMATED and not read.activated:
        return np.where(read.deterministic, read.mean, np.nan)
    return read.mean


def compensate(prepared, plan: Plan, stats: dict[int, GroupStatistics]) -> Plan:
    """A new Plan: `plan` with `shift` (and `consumer_shift` where consumers read different means) for every
    group that loses or merges channels and has statistics.  `prepared` is the model the plan and the
    statistics were made for (`pipeline.Prepared`); the input plan is not changed."""
    groups = prepared.analysis.groups
    out = Plan({})
    for gid, gplan in plan.groups.items():
        size = groups[gid].size
        reduced = len(gplan.keep) < size or gplan.fold is not None or gplan.merge is not None
        st = stats.get(gid)
        if not reduced or st is None or st.source == "none":
            out.groups[gid] = gplan
            continue
        fold, merge = _matrices(gplan, size)
        vectors = {node: lost_means(_trusted(read), fold, merge) for node, read in sorted(st.reads.items())}
        shift = next(iter(vectors.values()))
        own = {node: v for node, v in vectors.items() if not np.array_equal(v, shift)}
        out.groups[gid] = GroupPlan(gplan.keep, gplan.fold, gplan.merge, shift, own)
    return out


def compensation_summary(plan: Plan, stats: dict[int, GroupStatistics]) -> dict[int, dict]:
    """Per compensated group, for reports: where the means came from, how many channels are shifted, how many
    of them are deterministic, and the mean |shift|."""
    summary = {}
    for gid, gplan in sorted(plan.groups.items()):
        if gplan.shift is None:
            continue
        shifted = gplan.shift != 0
        st = stats.get(gid)
        summary[gid] = {"source": st.source if st else "none", "shifted": int(shifted.sum()),
                        "deterministic": int((shifted & st.deterministic).sum()) if st else 0,
                        "mean_abs_shift": float(np.abs(gplan.shift[shifted]).mean()) if shifted.any() else 0.0,
                        "consumer_overrides": len(gplan.consumer_shift)}
    return summary


def statistics_before_folding(prepared, group_ids, compute) -> dict:
    """`compute(model_prepared, group_ids)` (e.g. `channel_statistics` without data) for a model prepared with
    its BatchNorms folded (the merging methods fold first), taken from the model BEFORE folding wherever that
    one's groups match: folding keeps the function, so what each consumer reads has the same moments, but only
    the unfolded model still has the BatchNorm statistics that give them data-free ("bn").  Without this, every
    merge on a BatchNorm-kept export was compensated and ranked as if the BatchNorms had never been there.

    A group matches when the unfolded model has a group of the same first producer, size, frozen channels and
    consumer nodes; others (and models prepared without folding) keep `compute(prepared, ...)`'s result."""
    folded = compute(prepared, group_ids)
    if "FoldBatchNormPass" not in prepared.passes or prepared.original is None:
        return folded
    if not any(n.op_type == "BatchNormalization" for n in prepared.original.graph.node):
        return folded
    from dataclasses import replace

    from onnx_prune.analysis.channels import analyze_channels
    from onnx_prune.runtime.shapes import infer_shapes

    original = prepared.original
    unfolded = replace(prepared, model=original, analysis=analyze_channels(original, infer_shapes(original)),
                       passes=(), original=None)
    by_name = {g.name: g for g in unfolded.analysis.groups}
    matched = {}
    for gid in group_ids:
        group = prepared.analysis.groups[gid]
        twin = by_name.get(group.name)
        if twin is not None and twin.size == group.size and np.array_equal(twin.frozen, group.frozen) \
                and twin.nodes("consumer") == group.nodes("consumer"):
            matched[gid] = twin.id
    before = compute(unfolded, sorted(set(matched.values())))
    out = dict(folded)
    for gid, twin_id in matched.items():
        stats = before.get(twin_id)
        if stats is not None and stats.source == "bn":
            out[gid] = replace(stats, group=gid)
    return out
