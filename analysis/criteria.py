"""Data-free saliency of every channel of a group, from its weights."""
from __future__ import annotations

from typing import Callable

import numpy as np

from onnx_prune.analysis.channels import Group

Weights = Callable[[str], np.ndarray]  # initializer name -> array


def _per_position(values: np.ndarray, axis: int, norm: str) -> np.ndarray:
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
    if norm == "l1":
        return np.abs(rows).sum(axis=1)
    return np.sqrt((rows * rows).sum(axis=1))


def filter_norm(group: Group, weights: Weights, norm: str) -> np.ndarray:
    """Sum over the group's producers of each channel's filter norm (L1 or L2 of its weight row and bias)."""
    score = np.zeros(group.size)
    for member in group.by_role("producer"):
        per_position = _per_position(weights(member.param), member.axis, norm)
        np.add.at(score, member.channels, per_position[member.positions])
    return score


CRITERIA: dict[str, Callable[[Group, Weights], np.ndarray]] = {
    "l1": lambda group, weights: filter_norm(group, weights, "l1"),
    "l2": lambda group, weights: filter_norm(group, weights, "l2"),
}
