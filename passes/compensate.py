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

Variance restoration (`restore_variance`, run before `compensate`): the kept channels of a reduced group are
scaled at the consumers by one factor s so that the variance the group contributes to its consumers' outputs
stays what it was; `compensate` then moves their means back ((1 - s) m_c on a kept channel).  See its docstring
for the first-order model used for merges.
"""
from __future__ import annotations

import numpy as np

from onnx_prune.analysis.criteria import TRUSTED_VARIANCE, batchnorm_after, filter_sets, row_energy
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
        reduced = gplan.reduces(size)
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


def compensation_summary(plan: Plan, stats: dict[int, GroupStatistics],
                         scales: dict[int, float] | None = None) -> dict[int, dict]:
    """Per compensated group, for reports: where the means came from, how many channels are shifted, how many
    of them are deterministic, the mean |shift|, and (`scales`, from `restore_variance`) the variance
    restoration's scale where one was applied."""
    summary = {}
    scales = scales or {}
    for gid, gplan in sorted(plan.groups.items()):
        if gplan.shift is None and gid not in scales:
            continue
        shift = gplan.shift if gplan.shift is not None else np.zeros(0)
        shifted = shift != 0
        st = stats.get(gid)
        summary[gid] = {"source": st.source if st else "none", "shifted": int(shifted.sum()),
                        "deterministic": int((shifted & st.deterministic).sum()) if st and shift.size else 0,
                        "mean_abs_shift": float(np.abs(shift[shifted]).mean()) if shifted.any() else 0.0,
                        "consumer_overrides": len(gplan.consumer_shift)}
        if gid in scales:
            summary[gid]["variance_scale"] = scales[gid]
    return summary


# --- variance restoration

RESTORE_SOURCES = TRUSTED_VARIANCE  # variances worth restoring (the others do not rank channels)
RESTORE_CAP = 1.5  # largest scale applied (measured: EfficientNet-Lite0 BN at 80% of MACs 0.581 / 0.600 / 0.614
                   # with caps 2 / 1.5 / 1.25, MobileNetV2 BN 0.371 / 0.371 / 0.367; merge_quality.md)
ROUNDING = 1e-9    # a relative variance loss below this is float rounding (an exact merge): nothing to restore
RESTORE_MERGES = True  # also groups whose plan merges (a fold or merge matrix), not only plainly pruned ones


def _by_channel(layer, size: int) -> np.ndarray:
    """A layer's weight rows per group channel (`FilterSet.by_channel`), without the bias column."""
    return layer.by_channel(size, layer.rows[:, :-1])


def residual_fraction(layers_by_role: dict[str, list], fold: np.ndarray, merge: np.ndarray, size: int
                      ) -> np.ndarray:
    """Per channel c, the share of its variance the rewritten model no longer carries, first order.

    The consumers read channel c as ``sum_k fold[c, k] x'_k``, x'_k made by the rows ``sum_d merge[d, k] row_d``:
    the row c is rebuilt as ``(fold merge^T R)[c]``.  With white inputs to the layer the share of the output's
    variance that is lost is ``||R_c - rebuilt_c||^2 / ||R_c||^2`` (capped at 1): 1 for a removed channel, 0 for
    a kept one or an exact duplicate, between for a merged member.  Producers count together (a residual stream's
    channel is their sum); each carrier (depthwise kernel, per-channel scale) keeps what the layers before left
    (``explained *= 1 - lost share``)."""
    rebuilt = fold @ merge.T
    explained = np.ones(size)
    stages = [np.hstack(mats)] if (mats := [_by_channel(p, size) for p in layers_by_role["producer"]]) else []
    stages += [_by_channel(c, size) for c in layers_by_role["carrier"]]
    for rows in stages:
        if rows.shape[1] == 0:
            continue
        norm, miss = row_energy(rows), row_energy(rows - rebuilt @ rows)
        lost = np.where(norm > 0, np.minimum(miss / np.where(norm > 0, norm, 1.0), 1.0), (miss > 0) * 1.0)
        explained *= 1.0 - lost
    return 1.0 - explained


def variance_scale(group, gplan: GroupPlan, st: GroupStatistics, weights, bn_after: dict,
                   sources: tuple[str, ...] | None = None, cap: float | None = None) -> float | None:
    """The factor s for a group's kept channels at its consumers, or None (statistics not trusted, means that
    `compensate` could not correct, nothing read).  Per consumer k (energies e = ||W_k[:, c, taps]||^2, the
    same sums as the bnvar criterion; v the variance k reads), and delta the `residual_fraction`:

        lost  = sum_k sum_c e_kc v_kc delta_c
        after = sum_k sum_j ||W_k fold[:, j]||^2 v'_kj,   v'_kj = sum_d w_dj v_kd (1 - delta_d)

    with w the merge weights normalised per kept channel (the merged channel's variance: each member's
    explained part, averaged as the rows are).  s = sqrt((after + lost) / after), capped at `cap`.  For plain
    pruning this is sqrt(sum_all e v / sum_kept e v); an exact merge (identical channels) loses nothing: s = 1.
    Model: a channel is its kept/merged counterpart plus an independent residual, channels independent
    (as bnvar assumes).  `sources`, `cap`: default RESTORE_SOURCES, RESTORE_CAP."""
    sources = RESTORE_SOURCES if sources is None else sources
    cap = RESTORE_CAP if cap is None else cap
    size = group.size
    fold, merge = _matrices(gplan, size)
    layers = {role: filter_sets(group, weights, (role,), bn_after=bn_after) for role in ("producer", "carrier")}
    delta = residual_fraction(layers, fold, merge, size)
    columns = np.abs(merge).sum(axis=0)
    share = np.abs(merge) / np.where(columns > 0, columns, 1.0)
    carries = (fold != 0).any(axis=1)
    lost = after = 0.0
    consumers = filter_sets(group, weights, ("consumer",))
    if not consumers:
        return None
    for consumer in consumers:
        read = st.reads.get(consumer.node)
        if read is None or read.source not in sources:
            return None
        var = np.where(np.isfinite(read.var), read.var, 0.0)
        # `compensate` must be able to move the scaled channels' means back
        if not np.isfinite(_trusted(read)[carries & (var > 0)]).all():
            return None
        rows = _by_channel(consumer, size)
        lost += float((row_energy(rows) * var * delta).sum())
        after += float((row_energy(fold.T @ rows) * (share.T @ (var * (1.0 - delta)))).sum())
    if not after > 0 or lost <= ROUNDING * after:
        return 1.0
    return min(float(np.sqrt((after + lost) / after)), cap)


def restore_variance(prepared, plan: Plan, stats: dict[int, GroupStatistics],
                     sources: tuple[str, ...] | None = None, cap: float | None = None,
                     bn_after: dict | None = None) -> tuple[Plan, dict[int, float]]:
    """`plan` with every reduced group's `fold` scaled by its `variance_scale` (fold = I[:, keep] for plain
    pruning), and the scales applied (groups left alone have none; a scale of 1 leaves the group's plan as
    it was).  Run `compensate` afterwards: it corrects the means the scaling moves.  The input plan is not
    changed.  `bn_after`: `analysis.criteria.batchnorm_after` of the prepared model, if the caller has it."""
    groups = prepared.analysis.groups
    weights = prepared.weights()
    bn_after = batchnorm_after(prepared.model) if bn_after is None else bn_after
    out, scales = Plan({}), {}
    for gid, gplan in plan.groups.items():
        group, st = groups[gid], stats.get(gid)
        wanted = gplan.reduces(group.size) and st is not None and (RESTORE_MERGES or not gplan.merges)
        scale = variance_scale(group, gplan, st, weights, bn_after, sources, cap) if wanted else None
        out.groups[gid] = gplan
        if scale is None:
            continue
        scales[gid] = scale
        if scale != 1.0:
            fold, _ = _matrices(gplan, group.size)
            out.groups[gid] = GroupPlan(gplan.keep, fold * scale, gplan.merge, gplan.shift,
                                        dict(gplan.consumer_shift))
    return out, scales


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
