"""Similarity-based selection (METHODS.md §4): drop one of each most-similar pair of filters.

Each channel's filters (all the group's producers, BatchNorm folded) give a unit prototype; channels are
visited by ascending distance to their nearest neighbour: the visited one is kept and its neighbour marked
redundant, until enough are.  Optional data-free compensation folds a removed channel's consumer columns into
its nearest kept neighbour, scaled by the ratio of their filter norms, as a Plan `fold`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_prune.analysis.channels import Group
from onnx_prune.analysis.criteria import Scoring, filter_sets, nearest_exact, nearest_nystrom, prototypes
from onnx_prune.passes.plan import GroupPlan


def channel_prototypes(group: Group, scoring: Scoring) -> tuple[np.ndarray, np.ndarray]:
    """(unit prototype per channel over all producers, L2 norm of each channel's filters)."""
    parts, norms = [], np.zeros(group.size)
    for filters in filter_sets(group, scoring.weights, ("producer",), scoring.bn_after):
        first = np.unique(filters.channels, return_index=True)[1]  # one position per channel
        proto = np.zeros((group.size, prototypes(filters).shape[1]))
        proto[filters.channels[first]] = prototypes(filters)[first]
        parts.append(proto)
        np.add.at(norms, filters.channels, (filters.rows ** 2).sum(axis=1))
    stacked = np.hstack(parts) if parts else np.eye(group.size)
    lengths = np.linalg.norm(stacked, axis=1, keepdims=True)
    return stacked / np.where(lengths > 0, lengths, 1.0), np.sqrt(norms)


@dataclass
class SimilaritySelect:
    """A `select(group, n_keep) -> GroupPlan` for the allocator."""
    scoring: Scoring
    compensate: bool = False
    nystrom: bool = False
    _seen: dict = field(default_factory=dict, repr=False)  # group id -> prototypes, neighbours (targets re-ask)

    def _neighbours(self, group: Group):
        if group.id not in self._seen:
            proto, norms = channel_prototypes(group, self.scoring)
            nearest = nearest_nystrom(proto, self.scoring.landmarks) if self.nystrom else nearest_exact(proto)
            self._seen[group.id] = (proto, norms, *nearest)
        return self._seen[group.id]

    def __call__(self, group: Group, n_keep: int) -> GroupPlan:
        proto, norms, neighbour, distance = self._neighbours(group)
        n_remove = group.size - n_keep
        state = np.where(group.frozen, 1, 0)  # 1 kept, -1 redundant, 0 undecided
        removed = 0
        for i in np.lexsort((np.arange(group.size), distance)):
            if removed == n_remove:
                break
            j = neighbour[i]
            if state[i] == -1:
                continue
            state[i] = 1
            if state[j] == 0:
                state[j] = -1
                removed += 1
        undecided = np.nonzero(state == 0)[0]
        extra = undecided[np.lexsort((undecided, distance[undecided]))][:n_remove - removed]
        state[extra] = -1
        removed += len(extra)
        if removed < n_remove:  # every channel decided and too few redundant: the most redundant kept ones go
            kept_free = np.nonzero((state == 1) & ~group.frozen)[0]
            state[kept_free[np.lexsort((kept_free, distance[kept_free]))][:n_remove - removed]] = -1
        keep = np.nonzero(state != -1)[0]
        fold = self._fold(proto, norms, keep) if self.compensate else None
        return GroupPlan(keep, fold)

    @staticmethod
    def _fold(proto: np.ndarray, norms: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Identity on kept channels; each removed one folds into its most similar kept one (same sign)."""
        fold = np.eye(len(proto))[:, keep]
        cosine = proto @ proto[keep].T
        for c in np.setdiff1d(np.arange(len(proto)), keep):
            k = int(np.argmax(cosine[c]))
            if cosine[c, k] > 0 and norms[keep[k]] > 0:  # an opposite filter is not a stand-in after a Relu
                fold[c, k] = norms[c] / norms[keep[k]]
        return fold
