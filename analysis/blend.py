"""Criteria clustering and blended scores (METHODS.md §3).

Per group, every criterion of a pool scores the group's free (not frozen) channels; the Spearman rank
correlation rho between every pair of criteria says how alike they rank the channels.  Criteria are clustered
by average-linkage agglomeration on the distance 1 - rho, cut at ``threshold``: two clusters merge while their
members' mean correlation is at least 1 - threshold.

The default cut, 0.2 (mean rho >= 0.8), is where "the same criterion" ends.  For rank-correlated scores
(bivariate normal approximation, P = 1/4 + asin(rho) / 2 pi), two criteria at rho = 0.8 remove 80% the same
channels at a 50% ratio, at rho = 0.3 only 60% (50% is chance).  Measured on the four trained Fashion-MNIST
nets (benchmarks/results/blend.md, median over 52 groups), variants of one weight-magnitude measure sit at or
above 0.8 (l2 / bn 1.00 where the export folded BatchNorms and bn falls back to l2, l2 / fpgm 0.91, fpgm / bn
0.85, l1 / l2 0.84, l1 / fpgm 0.80), while criteria that look at something else sit far below (similarity,
activation, apoz against the norms and each other: -0.15 to 0.34).  l1 and l2 split where a folded BatchNorm
shift (the bias column) weighs more in l2 than in l1.

Each cluster is represented by its member with the highest mean correlation to the other members (ties: the
first in pool order).  A *blend* is a weighted sum of unit-norm criterion scores, per group:
``B = sum_k alpha_k * s_k / ||s_k||``, with one weight per criterion shared by all groups.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import spearmanr

from onnx_prune.analysis.channels import ChannelAnalysis

DEFAULT_POOL = ("l1", "l2", "fpgm", "bn", "similarity", "bnvar")  # bnvar: best single data-free criterion measured
CALIBRATION_POOL = ("activation", "apoz")   # added to the pool when calibration data is given
DEFAULT_THRESHOLD = 0.2                      # cut on 1 - rho (see the module docstring)
MIN_CHANNELS = 3                             # fewer free channels than this say nothing about rankings

PoolScores = dict[str, dict[int, np.ndarray]]  # criterion -> group id -> score per channel


def rank_correlation(scores: np.ndarray) -> np.ndarray:
    """Spearman rho between the rows of `scores` (criteria x channels).

    A constant row ranks nothing: it correlates 1 with other constant rows and 0 with the rest."""
    constant = np.array([np.ptp(row) == 0 for row in scores])
    rho = np.where(np.logical_and.outer(constant, constant), 1.0, 0.0)
    varying = np.nonzero(~constant)[0]
    if len(varying) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stat = spearmanr(scores[varying], axis=1).statistic
        rho[np.ix_(varying, varying)] = np.array([[1.0, stat], [stat, 1.0]]) if len(varying) == 2 else stat
    np.fill_diagonal(rho, 1.0)
    return np.clip(rho, -1.0, 1.0)


def cluster_criteria(rho: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[list[int]]:
    """Clusters of criterion indices, each sorted, ordered by their first member."""
    k = len(rho)
    if k == 1:
        return [[0]]
    distance = squareform(np.clip(1.0 - rho, 0.0, 2.0), checks=False)
    labels = fcluster(linkage(distance, method="average"), t=threshold, criterion="distance")
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(index)
    return sorted(clusters.values())


def representative(rho: np.ndarray, members: list[int]) -> int:
    """The member with the highest mean correlation to the others of its cluster (ties: the first)."""
    if len(members) == 1:
        return members[0]
    block = rho[np.ix_(members, members)]
    mean_to_others = (block.sum(axis=1) - 1.0) / (len(members) - 1)
    return members[int(np.argmax(mean_to_others))]


def free_channel_matrix(pool_scores: PoolScores, pool: tuple[str, ...], gid: int, frozen: np.ndarray) -> np.ndarray:
    """Criteria x free channels of one group."""
    return np.vstack([pool_scores[name][gid][~frozen] for name in pool])


def named(clusters: list[list[int]], pool: tuple[str, ...]) -> list[list[str]]:
    return [[pool[i] for i in cluster] for cluster in clusters]


def summarize_clusters(pool_scores: PoolScores, analysis: ChannelAnalysis,
                       threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Per-group clusters, their most common structures, and the model-level clustering, as plain data.

    The model-level correlation is the mean of the groups' rho weighted by free channels, over the groups with
    at least MIN_CHANNELS free channels (identity when there is none: no evidence of redundancy)."""
    pool = tuple(pool_scores)
    group_ids = sorted(next(iter(pool_scores.values()), {}))
    groups, structures, skipped = [], Counter(), 0
    total_rho, total_weight = np.zeros((len(pool), len(pool))), 0
    for gid in group_ids:
        group = analysis.groups[gid]
        n_free = int((~group.frozen).sum())
        if n_free < MIN_CHANNELS:
            skipped += 1
            continue
        rho = rank_correlation(free_channel_matrix(pool_scores, pool, gid, group.frozen))
        clusters = cluster_criteria(rho, threshold)
        total_rho += n_free * rho
        total_weight += n_free
        names = named(clusters, pool)
        structures[tuple(tuple(c) for c in names)] += 1
        groups.append({"group": gid, "name": group.name, "channels": n_free, "clusters": names,
                       "representatives": [pool[representative(rho, c)] for c in clusters],
                       "correlation": np.round(rho, 4).tolist()})
    model_rho = total_rho / total_weight if total_weight else np.eye(len(pool))
    model_clusters = cluster_criteria(model_rho, threshold)
    counted = len(groups)
    return {
        "pool": list(pool), "threshold": threshold, "linkage": "average", "distance": "1 - spearman",
        "groups": groups, "skipped_groups": skipped,
        "structures": [{"clusters": [list(c) for c in structure], "groups": count, "share": count / counted}
                       for structure, count in structures.most_common()],
        "model": {"correlation": np.round(model_rho, 4).tolist(), "clusters": named(model_clusters, pool),
                  "representatives": [pool[representative(model_rho, c)] for c in model_clusters]},
    }


def _braced(clusters: list[list[str]]) -> str:
    return " ".join("{" + " ".join(c) + "}" for c in clusters)


def format_cluster_summary(summary: dict, per_group: bool = False) -> str:
    """Text for `analyze`: the model-level correlation and clusters, the most common structures."""
    pool = summary["pool"]
    width = max(6, *(len(n) for n in pool)) + 1
    counted = len(summary["groups"])
    lines = [f"criteria clusters: Spearman rho per group, {summary['linkage']} linkage on 1 - rho, "
             f"cut at {summary['threshold']:g}; pool: {' '.join(pool)}",
             f"model level (mean rho over {counted} group(s), weighted by free channels; "
             f"{summary['skipped_groups']} group(s) with < {MIN_CHANNELS} free channels left out):",
             " " * width + "".join(f"{n:>{width}}" for n in pool)]
    for name, row in zip(pool, summary["model"]["correlation"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.2f}" for v in row))
    lines.append(f"clusters: {_braced(summary['model']['clusters'])}   "
                 f"representatives: {', '.join(summary['model']['representatives'])}")
    if summary["structures"]:
        lines.append("most common cluster structures:")
        lines += [f"  {s['groups']:>4}/{counted} groups: {_braced(s['clusters'])}" for s in summary["structures"][:5]]
    if per_group:
        lines.append("per group:")
        lines += [f"  {g['group']:>4} {g['name']} ({g['channels']} ch): {_braced(g['clusters'])}"
                  for g in summary["groups"]]
    return "\n".join(lines)


def unit_scores(pool_scores: PoolScores) -> PoolScores:
    """Every criterion's scores divided by their L2 norm per group (zero stays zero)."""
    return {name: {gid: s / (np.linalg.norm(s) or 1.0) for gid, s in by_group.items()}
            for name, by_group in pool_scores.items()}


def blend_scores(units: PoolScores, weights: dict[str, float]) -> dict[int, np.ndarray]:
    """B = sum_k weights[k] * units[k] per group, over the criteria of `weights` (in its order)."""
    names = list(weights)
    return {gid: sum(float(weights[name]) * units[name][gid] for name in names)
            for gid in units[names[0]]}
