"""Centripetal cluster-and-merge (METHODS.md §5): C-SGD's end state, reached without training.

Each group's channels are clustered by k-means on their filters (the concatenated BatchNorm-folded [W | b] rows
of every producer of the group, so tied layers of a residual chain share one clustering: the first producer sets
the pace, the others follow), k = the channel count the allocation keeps.  A cluster becomes one channel: its
producer and carrier rows are replaced by the cluster's centroid (or medoid) through the Plan's `merge`, and
its consumers' input slices are summed over the cluster through the Plan's `fold`.  Exact where a cluster's
members are identical; otherwise an approximation whose size `ClusterStats.spread` reports.  Frozen channels
stay singletons, untouched.

Fold BatchNorm into the convs first (`onnx_prune.pipeline.prepare_folded`): a merge averages the rows of the linear layer, which is
exact only when nothing per-channel but carriers sits between it and the consumers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.vq import kmeans2

from onnx_prune.analysis.channels import ChannelAnalysis, Group
from onnx_prune.analysis.criteria import Scoring, channel_scores, filter_sets
from onnx_prune.passes.allocate import select_top
from onnx_prune.passes.merge import identical_rows
from onnx_prune.passes.plan import GroupPlan, Plan

KMEANS_ITERATIONS = 10  # scipy's default; on the zoo the spread no longer changes after it


def channel_features(group: Group, scoring: Scoring, roles: tuple[str, ...] = ("producer", "carrier")
                     ) -> np.ndarray:
    """One row per channel: its [W | b] rows in every producer of the group, BatchNorm folded, concatenated as
    they are, then its rows in every carrier (depthwise kernels, per-channel constants), each carrier layer
    scaled to the producers' mean row norm.

    Carriers count because the merge averages their rows too: two channels with the same expand rows but
    different depthwise kernels are different channels (clustering the producers alone merged them, averaging
    the kernels -- on the pretrained MobileNetV2 that is most of what merging did).  Scaling each carrier to
    the producers' size lets it weigh as much as they do together, whatever its fan-in (a 3x3 kernel against
    a 96-input expand row); the producers keep their relative scales (rescaling them too cost 0.25 top-1 on
    the Fashion-MNIST SE-net at 80% of MACs).  A channel owning several positions of a layer (a grouped conv
    repeats it in every conv group) gets all of them side by side; a layer that does not touch a channel leaves
    zeros."""
    producers, carriers = [], []
    for filters in filter_sets(group, scoring.weights, roles, scoring.bn_after):
        (carriers if filters.role == "carrier" else producers).append(filters.by_channel(group.size))
    if not producers and not carriers:
        return np.zeros((group.size, 0))
    produced = np.hstack(producers) if producers else np.zeros((group.size, 0))
    size = np.linalg.norm(produced, axis=1).mean() if producers else 1.0
    scaled = []
    for block in carriers:
        scale = np.linalg.norm(block, axis=1).mean()
        scaled.append(block * (size / scale) if scale > 0 and size > 0 else block)
    return np.hstack([produced] + scaled)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Cluster numbers 0, 1, ... in order of first appearance (deterministic, and no gaps)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _split_until(rows: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Add clusters until there are k: the member farthest from its centroid, over all clusters, leaves to
    start its own (the largest cluster gives one up where every cluster is tight)."""
    labels = labels.copy()
    while labels.max() + 1 < k:
        n_clusters = labels.max() + 1
        centroids = np.array([rows[labels == j].mean(axis=0) for j in range(n_clusters)])
        distance = np.linalg.norm(rows - centroids[labels], axis=1)
        sizes = np.bincount(labels, minlength=n_clusters)
        distance[sizes[labels] == 1] = -1.0  # a singleton has nobody to give up
        candidates = np.flatnonzero(distance == distance.max())
        if distance.max() <= 0:
            biggest = np.flatnonzero(sizes == sizes.max())[0]
            candidates = np.flatnonzero(labels == biggest)[1:]
        labels[candidates[0]] = n_clusters
    return labels


def kmeans_plus_plus(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds: each next centre drawn with probability proportional to the squared distance to the
    nearest centre so far.  scipy's `minit='++'` recomputes every distance to every centre at each step
    (k^2 n d); keeping the nearest distance makes it k n d, which matters for groups of ~1000 channels."""
    picks = [int(rng.integers(len(rows)))]
    nearest = ((rows - rows[picks[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        picks.append(int(rng.choice(len(rows), p=nearest / nearest.sum())))
        nearest = np.minimum(nearest, ((rows - rows[picks[-1]]) ** 2).sum(axis=1))
    return rows[picks]


def cluster_rows(rows: np.ndarray, k: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Exactly k non-empty clusters of `rows`: a label in [0, k) per row, numbered by first appearance.

    Identical rows always share a cluster when there are at most k distinct rows (k-means is then skipped);
    seeded k-means++ and Lloyd iterations (scipy's kmeans2) otherwise, with any empty cluster refilled by
    splitting the loosest one."""
    n = len(rows)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} rows")
    distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
    if len(distinct) <= k:
        labels = inverse.ravel()
    else:  # more than k distinct rows: the seeding always finds a row away from every centre so far
        seeds = kmeans_plus_plus(rows, k, np.random.default_rng(seed))
        with warnings.catch_warnings():  # empty clusters are refilled below
            warnings.simplefilter("ignore", UserWarning)
            _, labels = kmeans2(rows, seeds, iter=iterations, minit="matrix")
    return _split_until(rows, _relabel(labels), k)


@dataclass
class ClusterStats:
    """How one group was merged: the size of each kept channel's cluster and how tight the clusters are."""
    group: int
    name: str
    size: int
    kept: int
    cluster_sizes: list[int]   # per kept channel, in `keep` order
    spread: float              # mean distance of a channel's filters to its cluster centre / mean filter norm
    pruned: int = 0            # channels removed without merging (a linear stream's, `CentripetalSelect`)

    @property
    def merged(self) -> int:
        """Channels folded into another one (size - kept)."""
        return self.size - self.kept

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CentripetalSelect:
    """A `select(group, n_keep) -> GroupPlan` for `Allocator.allocate`: cluster-and-merge.

    `medoid`: keep each cluster's medoid (the member with the least total distance to the others) instead of
    the centroid, so that every kept row is a real filter.  `stats` collects a ClusterStats per call."""
    scoring: Scoring
    medoid: bool = False
    iterations: int = KMEANS_ITERATIONS
    stats: dict[int, ClusterStats] = field(default_factory=dict)

    def __call__(self, group: Group, n_keep: int) -> GroupPlan:
        features = channel_features(group, self.scoring)
        if self._reads_linear(group):
            return self._prune_linear(group, n_keep, features)
        free = np.flatnonzero(~group.frozen)
        frozen = np.flatnonzero(group.frozen)
        n_free_kept = n_keep - len(frozen)
        if n_free_kept < 0 or n_keep < 1:
            raise ValueError(f"group {group.id} cannot keep {n_keep} channels: {len(frozen)} are frozen")
        members = [np.array([c]) for c in frozen]
        if len(free) and n_free_kept:  # (none kept: the free channels are simply removed)
            labels = cluster_rows(features[free], n_free_kept, self.scoring.seed + group.id, self.iterations)
            members += [free[labels == j] for j in range(n_free_kept)]
        plan_columns = [self._column(features, cluster) for cluster in members]
        plan_columns.sort(key=lambda column: column[0])
        keep = np.array([c[0] for c in plan_columns])
        fold = np.zeros((group.size, len(keep)))
        merge = np.zeros((group.size, len(keep)))
        distance = np.full(group.size, np.nan)  # stays NaN for a removed channel: it joins no cluster
        for j, (_, cluster, weights, centre) in enumerate(plan_columns):
            fold[cluster, j] = 1.0
            merge[cluster, j] = weights
            distance[cluster] = np.linalg.norm(features[cluster] - centre, axis=1)
        clustered = ~np.isnan(distance)
        distance = distance[clustered]
        mean_norm = float(np.linalg.norm(features[clustered], axis=1).mean())
        self.stats[group.id] = ClusterStats(group.id, group.name, group.size, len(keep),
                                            [len(c[1]) for c in plan_columns],
                                            float(distance.mean() / mean_norm) if mean_norm > 0 else 0.0)
        return GroupPlan(keep, fold, merge)

    def _reads_linear(self, group: Group) -> bool:
        """Do the group's consumers read a linear stream (no activation between the producers and them: a
        linear bottleneck, a residual sum)?  Unknown (no statistics to say) counts as no."""
        if self.scoring.statistics is None:
            return False
        stats = self.scoring.group_statistics(group.id)
        return stats is not None and any(not read.activated for read in stats.reads.values())

    def _prune_linear(self, group: Group, n_keep: int, features: np.ndarray) -> GroupPlan:
        """A linear stream's channels are not merged unless identical: exact duplicates fold into their first
        copy, the rest are pruned by `bnvar` (and compensated like plain pruning).  Averaging distinct linear
        channels was the costliest merge measured: pruning a quarter of one of the pretrained MobileNetV2's
        bottleneck groups cost 2-3x the output KL of pruning it by bnvar (benchmarks/results/merge_quality.md)."""
        scores = channel_scores(group, self.scoring, "bnvar", "domino-o")
        first, labels = identical_rows(features)
        twin_of = first[labels]  # each channel's first identical copy (itself for the first)
        twin = (twin_of != np.arange(group.size)) & ~group.frozen
        keep = select_top(np.where(twin, -np.inf, scores), group.frozen, n_keep)
        column = np.full(group.size, -1)
        column[keep] = np.arange(len(keep))
        fold = np.eye(group.size)[:, keep]
        folded = (column < 0) & (column[twin_of] >= 0)  # removed, with its identical copy kept
        fold[np.flatnonzero(folded), column[twin_of[folded]]] = 1.0
        sizes = fold.sum(axis=0).astype(int).tolist()
        self.stats[group.id] = ClusterStats(group.id, group.name, group.size, len(keep), sizes, 0.0,
                                            group.size - sum(sizes))
        return GroupPlan(keep, fold if folded.any() else None)

    def _column(self, features: np.ndarray, cluster: np.ndarray):
        """(representative channel, members, merge weights, centre row) of one cluster."""
        rows = features[cluster]
        if self.medoid:
            squared = (rows ** 2).sum(axis=1)
            total = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * rows @ rows.T, 0.0)).sum(axis=1)
            pick = int(np.argmin(total))
            weights = np.zeros(len(cluster))
            weights[pick] = 1.0
            return int(cluster[pick]), cluster, weights, rows[pick]
        centre = rows.mean(axis=0)
        pick = int(np.argmin(np.linalg.norm(rows - centre, axis=1)))  # where the merged channel sits
        return int(cluster[pick]), cluster, np.full(len(cluster), 1.0 / len(cluster)), centre
