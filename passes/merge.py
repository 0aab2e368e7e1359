"""Output merging (RED, METHODS.md §2.2): channels that compute the same thing are merged into one.

Within a group, two channels merge when they are identical everywhere the group goes:

- the same rows (weights and bias) in every producer of the group, and the same per-channel values in every
  carrier (depthwise filters, per-channel Mul/Add constants, BatchNorms that could not be folded);
- the same number of positions in every member and every tensor the group's channels flow through, so that
  they meet the same ops (a Split that sends them to different branches keeps them apart) and every consumer
  that reads one reads the other.

The kept channel (a frozen one where the cluster has one; frozen channels never merge away) takes over:
its consumers' columns become the sum of the cluster's columns, a Plan ``fold`` applied by the one rewrite
pass (`ApplyPlanPass`).

Why this is exact.  The channel analysis gives a channel a layout only through ops it can follow channel by
channel; anything that mixes channels (Softmax or LayerNorm over channels, a reshape it cannot map, an
unknown op) freezes them.  Along a group, then, every op is elementwise per channel (activations, pooling,
Add/Mul with tensors of the same group, per-channel constants), so two channels with identical producers and
carriers carry identical values at every consumer, whatever the activation, and W·x = (W_c + W_d)·x_c.

BatchNorm: fold it first (`FoldBatchNormPass`, which the RED method runs before its analysis).  Two filters that differ only
by their BN statistics are different channels; after folding the filters are the whole story, and hashing
(`HashWeightsPass`) then sees the weights the runtime uses.  A BN that could not be folded stays a carrier
and must match too.

``merge_tol > 0`` also merges near-identical channels: relative L2 distance ``||a - b|| / max(||a_w||, ||b_w||)``
at most ``merge_tol`` for the rows of every producer and carrier layer (weights and bias together, relative to
the larger weight norm: `relative_distances`).  Clusters
form greedily around leaders taken in channel order (frozen channels first); the kept rows become the
cluster's mean (``merge``) unless the leader is frozen.  `MergeSearch` computes the candidates and their
distances once, so that a tolerance can be searched (`onnx_prune.red` does, to reach a MAC target).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from onnx_prune.analysis.channels import ChannelAnalysis, Group
from onnx_prune.analysis.criteria import Weights
from onnx_prune.passes.plan import GroupPlan, Plan


def placement_counts(analysis: ChannelAnalysis) -> dict[int, np.ndarray]:
    """Per group, a (channels x places) count matrix: how many positions each channel has in every member
    and every tensor the group reaches.  Channels can only merge with channels of the same column pattern."""
    columns: dict[int, list[np.ndarray]] = defaultdict(list)
    places = [m_ids for m_ids in analysis.param_ids.values()] + [lay.ids for lay in analysis.layouts.values()]
    for ids in places:
        groups = analysis.id_group[ids]
        for g in np.unique(groups):
            size = analysis.groups[g].size
            columns[int(g)].append(np.bincount(analysis.id_channel[ids[groups == g]], minlength=size))
    return {g: np.column_stack(cols) for g, cols in columns.items()}


def layer_parts(group: Group, weights: Weights, channels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For sorted `channels` (all with the same placement counts), per producer or carrier node a
    (len(channels) x features) block -- the node's weight and bias rows of each channel, positions in order,
    side by side -- and a mask of its bias columns (those of a 1-D parameter of a node that also has a
    weight of 2 or more dimensions)."""
    by_node: dict[str, list[tuple[np.ndarray, bool]]] = defaultdict(list)
    for member in group.members:
        present = np.isin(member.channels, channels)
        if member.role == "consumer" or not present.any():
            continue
        positions, owners = member.positions[present], member.channels[present]
        by_owner = np.lexsort((positions, owners))  # channel by channel, positions in order
        array = np.moveaxis(weights(member.param), member.axis, 0)
        rows = array.reshape(array.shape[0], -1)[positions[by_owner]]
        # equal counts: as many rows per channel
        by_node[member.node].append((rows.reshape(len(channels), -1), array.ndim == 1))
    out = []
    for _, parts in sorted(by_node.items()):
        has_weight = not all(one_d for _, one_d in parts)
        block = np.hstack([rows for rows, _ in parts])
        bias = np.concatenate([np.full(rows.shape[1], one_d and has_weight) for rows, one_d in parts])
        out.append((block, bias))
    return out


def layer_blocks(group: Group, weights: Weights, channels: np.ndarray) -> list[np.ndarray]:
    """`layer_parts`' blocks alone: per producer or carrier node, the weight and bias rows of each channel."""
    return [block for block, _ in layer_parts(group, weights, channels)]


def identical_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-exact equal rows (-0.0 equal to 0.0): (first row index of each distinct row, label of every row)."""
    canonical = np.ascontiguousarray(rows) + 0.0
    # a random linear key, summed column by column: elementwise ufuncs round the same way for every row, so
    # equal rows get equal keys (a BLAS product may not); different rows share a key only by accident
    weights = np.random.default_rng(0).uniform(0.5, 1.5, canonical.shape[1])
    keys = np.zeros(len(canonical))
    for column, weight in zip(canonical.T, weights):
        keys += column * weight
    _, first, labels = np.unique(keys, return_index=True, return_inverse=True)
    labels = labels.ravel()
    if np.array_equal(canonical, canonical[first[labels]]):
        return first, labels
    as_bytes = canonical.view(np.dtype((np.void, canonical.itemsize * canonical.shape[1]))).ravel()
    _, first, labels = np.unique(as_bytes, return_index=True, return_inverse=True)  # a key collision
    return first, labels.ravel()


def exact_clusters(blocks: list[np.ndarray], count: int) -> np.ndarray:
    """Cluster label per channel: equal labels = bit-identical rows in every block."""
    if not blocks:
        return np.zeros(count, dtype=np.int64)
    return identical_rows(np.hstack(blocks))[1]


def relative_distances(block: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """||a - b|| / max(||a_w||, ||b_w||) between all rows, a_w the row without its `bias` columns (default:
    none): the distance, weights and bias together, relative to the larger filter's weight norm -- what the
    two channels' outputs differ by, in units of their spread on inputs of unit variance.  Scaling by the
    whole row let a large bias hide the weights: on EfficientNet-Lite0, hundreds of nearly-off ReLU6 channels
    (small weights, bias about -1.4) were "within 0.3" of each other and merged into one, 103 and 231 at a
    time.  Rows whose weights are all zero are 0 apart when equal, else infinitely far.  The Gram matrices are
    float32: their rounding (~1e-3 relative distance) only matters far below useful tolerances, and exact
    duplicates are found bit for bit apart from it."""
    block = block.astype(np.float32)
    bias = np.zeros(block.shape[1], dtype=bool) if bias is None else np.asarray(bias, dtype=bool)
    squared = np.einsum("ij,ij->i", block, block, dtype=np.float64)
    gram = (block @ block.T).astype(np.float64)
    distance = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0))
    weights = block[:, ~bias]
    weight_squared = np.einsum("ij,ij->i", weights, weights, dtype=np.float64)
    scale = np.sqrt(np.maximum(weight_squared[:, None], weight_squared[None, :]))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = distance / scale
    return np.where(scale > 0, relative, np.where(distance > 0, np.inf, 0.0))


def near_clusters(distance: np.ndarray, exact: np.ndarray, frozen: np.ndarray, tol: float) -> np.ndarray:
    """Leader clustering: leaders in order (frozen first) absorb the free channels within `tol` (or exactly
    equal to them)."""
    close = (distance <= tol) | (exact[:, None] == exact[None, :])
    label = np.full(len(exact), -1)
    for leader in np.lexsort((np.arange(len(exact)), ~frozen)):
        if label[leader] >= 0:
            continue
        label[leader] = leader
        label[close[leader] & (label < 0) & ~frozen] = leader
    return label


@dataclass
class Candidates:
    """Channels of a group that may merge with each other (the same placement counts): their exact-duplicate
    labels and, for near-duplicate merging, their relative distances (the largest over the group's layers)."""
    channels: np.ndarray
    exact: np.ndarray
    distance: np.ndarray | None = None

    def labels(self, frozen: np.ndarray, tol: float) -> np.ndarray:
        if tol <= 0 or self.distance is None:
            return self.exact
        return near_clusters(self.distance, self.exact, frozen[self.channels], tol)


def merge_candidates(group: Group, weights: Weights, counts: np.ndarray, near: bool) -> list[Candidates]:
    out = []
    patterns = np.unique(counts, axis=0, return_inverse=True)[1].ravel()
    for pattern in np.unique(patterns):
        channels = np.nonzero(patterns == pattern)[0]
        if len(channels) < 2:
            continue
        parts = layer_parts(group, weights, channels)
        candidates = Candidates(channels, exact_clusters([block for block, _ in parts], len(channels)))
        if near:
            candidates.distance = np.zeros((len(channels), len(channels)))
            for block, bias in parts:
                candidates.distance = np.maximum(candidates.distance, relative_distances(block, bias))
        out.append(candidates)
    return out


@dataclass
class MergeSummary:
    """What merging found: channels merged away per group (by group name), and the Plan doing it."""
    plan: Plan
    merged: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.merged.values())


def keepers(labels: np.ndarray, frozen: np.ndarray) -> np.ndarray:
    """Per element, the index of the channel it merges into: its cluster's first frozen member, else its first
    member; every frozen element keeps itself."""
    keeper: dict[int, int] = {}
    out = np.arange(len(labels))
    for i in np.lexsort((np.arange(len(labels)), ~frozen)):
        first = keeper.setdefault(int(labels[i]), int(i))
        if not frozen[i]:
            out[i] = first
    return out


def cluster_plan(labels: np.ndarray, frozen: np.ndarray, average: bool) -> GroupPlan | None:
    """keep = one channel per cluster; fold sums the cluster's consumer columns; merge averages its rows."""
    keep = np.unique(labels)
    if len(keep) == len(labels):
        return None
    column = np.searchsorted(keep, labels)
    fold = np.zeros((len(labels), len(keep)))
    fold[np.arange(len(labels)), column] = 1.0
    if not average:
        return GroupPlan(keep, fold)
    sizes = fold.sum(axis=0)
    merge = fold / sizes
    fixed = frozen[keep]  # a frozen keeper's rows stay as they are
    merge[:, fixed] = np.eye(len(labels))[:, keep[fixed]]
    return GroupPlan(keep, fold, merge)


@dataclass
class MergeSearch:
    """Every prunable group's merge candidates, computed once; `plan(tol)` for any tolerance up to the
    distances computed (``near``), e.g. to search the tolerance that reaches a MAC target."""
    groups: list[tuple[Group, list[Candidates]]]

    @classmethod
    def of(cls, analysis: ChannelAnalysis, weights: Weights, near: bool,
           groups: set[int] | None = None) -> "MergeSearch":
        """Candidates of every prunable group (or of those in `groups`: excluded ones never merge)."""
        counts = placement_counts(analysis)
        return cls([(g, merge_candidates(g, weights, counts[g.id], near)) for g in analysis.prunable_groups
                    if groups is None or g.id in groups])

    def plan(self, tol: float) -> MergeSummary:
        summary = MergeSummary(Plan())
        for group, candidates in self.groups:
            labels = np.arange(group.size)
            for c in candidates:
                labels[c.channels] = c.channels[keepers(c.labels(group.frozen, tol), group.frozen[c.channels])]
            gplan = cluster_plan(labels, group.frozen, average=tol > 0)
            if gplan is not None:
                summary.plan.groups[group.id] = gplan
                summary.merged[group.name or str(group.id)] = group.size - len(gplan.keep)
        return summary


def merge_plan(analysis: ChannelAnalysis, weights: Weights, merge_tol: float = 0.0) -> MergeSummary:
    """The Plan merging every group's duplicate (``merge_tol`` 0) or near-duplicate channels."""
    return MergeSearch.of(analysis, weights, near=merge_tol > 0).plan(merge_tol)
