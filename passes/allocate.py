"""Turn channel scores into a Plan: how many channels each group keeps, and which."""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np

from onnx_prune.analysis.channels import ChannelAnalysis, Group
from onnx_prune.errors import PruneError
from onnx_prune.passes.plan import GroupPlan, Plan


def kept_count(size: int, ratio: float, round_to: int = 1, n_frozen: int = 0) -> int:
    """Channels a group of `size` keeps at `ratio`, rounded up to a multiple of `round_to`, never zero."""
    keep = size - math.floor(ratio * size + 1e-9)
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


def uniform_plan(analysis: ChannelAnalysis, scores: dict[int, np.ndarray], ratio: float,
                 round_to: int = 1, exclude: set[int] = frozenset()) -> Plan:
    """Remove the same share of channels from every prunable group, lowest scores first."""
    plan = Plan()
    for group in analysis.prunable_groups:
        if group.id in exclude:
            continue
        n_keep = kept_count(group.size, ratio, round_to, int(group.frozen.sum()))
        if n_keep < group.size:
            plan.groups[group.id] = GroupPlan(select_top(scores[group.id], group.frozen, n_keep))
    return plan


def group_scores(groups: list[Group], criterion) -> dict[int, np.ndarray]:
    return {g.id: criterion(g) for g in groups}
