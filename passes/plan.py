"""A Plan: for each group, which channels stay (`keep`) and how removed ones fold into them (`fold`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupPlan:
    """`keep`: sorted channel indices kept.  `fold`: C x K matrix for the consumers, W_new = W . fold along
    their input axis; None means plain pruning (fold = I[:, keep])."""
    keep: np.ndarray
    fold: np.ndarray | None = None

    def __post_init__(self):
        self.keep = np.asarray(self.keep, dtype=np.int64)
        if len(self.keep) == 0:
            raise ValueError("a plan may not empty a group")
        if np.any(np.diff(self.keep) <= 0):
            raise ValueError("keep must be strictly increasing")
        if self.fold is not None and self.fold.shape[1] != len(self.keep):
            raise ValueError(f"fold has {self.fold.shape[1]} columns for {len(self.keep)} kept channels")


@dataclass
class Plan:
    groups: dict[int, GroupPlan] = field(default_factory=dict)  # group id -> plan; absent = keep all

    def removes_anything(self, sizes: dict[int, int]) -> bool:
        return any(len(p.keep) < sizes[g] or p.fold is not None for g, p in self.groups.items())

    def to_json(self) -> str:
        return json.dumps({str(g): {"keep": p.keep.tolist(),
                                    "fold": None if p.fold is None else p.fold.tolist()}
                           for g, p in sorted(self.groups.items())}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        return cls({int(g): GroupPlan(np.array(p["keep"]), None if p["fold"] is None else np.array(p["fold"]))
                    for g, p in raw.items()})
