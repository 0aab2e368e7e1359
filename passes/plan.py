"""A Plan: for each group, which channels stay (`keep`) and how removed ones fold into them (`fold`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupPlan:
    """`keep`: sorted channel indices kept.  `fold`: C x K matrix for the consumers, W_new = W . fold along
    their input axis; None means plain pruning (fold = I[:, keep]).  `merge`: C x K matrix for producers and
    carriers, kept row k = sum_c merge[c, k] * row c (a cluster's centroid); None keeps rows as they are."""
    keep: np.ndarray
    fold: np.ndarray | None = None
    merge: np.ndarray | None = None

    def __post_init__(self):
        self.keep = np.asarray(self.keep, dtype=np.int64)
        if len(self.keep) == 0:
            raise ValueError("a plan may not empty a group")
        if np.any(np.diff(self.keep) <= 0):
            raise ValueError("keep must be strictly increasing")
        for name in ("fold", "merge"):
            matrix = getattr(self, name)
            if matrix is not None and matrix.shape[1] != len(self.keep):
                raise ValueError(f"{name} has {matrix.shape[1]} columns for {len(self.keep)} kept channels")


@dataclass
class Plan:
    groups: dict[int, GroupPlan] = field(default_factory=dict)  # group id -> plan; absent = keep all

    def removes_anything(self, sizes: dict[int, int]) -> bool:
        return any(len(p.keep) < sizes[g] or p.fold is not None or p.merge is not None
                   for g, p in self.groups.items())

    def to_json(self) -> str:
        def listed(matrix):
            return None if matrix is None else matrix.tolist()
        return json.dumps({str(g): {"keep": p.keep.tolist(), "fold": listed(p.fold), "merge": listed(p.merge)}
                           for g, p in sorted(self.groups.items())}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        def array(value):
            return None if value is None else np.array(value)
        return cls({int(g): GroupPlan(np.array(p["keep"]), array(p.get("fold")), array(p.get("merge")))
                    for g, p in raw.items()})
