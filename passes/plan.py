"""A Plan: for each group, which channels stay (`keep`), how removed ones fold into them (`fold`, `merge`), and
the constant that stands in for what the consumers lose (`shift`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupPlan:
    """`keep`: sorted channel indices kept.  `fold`: C x K matrix for the consumers, W_new = W . fold along
    their input axis; None means plain pruning (fold = I[:, keep]).  `merge`: C x K matrix for producers and
    carriers, kept row k = sum_c merge[c, k] * row c (a cluster's centroid); None keeps rows as they are.

    `shift`: C-vector, per channel c the constant its consumers lose on average, as they read it: the rewrite
    adds sum_c W_cons[:, c] * shift[c] (summed over kernel taps, through Concat offsets, Flatten blocks and
    conv groups) to every consumer's bias, with the ORIGINAL consumer weights.  For plain pruning it is the
    expected value of each removed channel and 0 for kept ones; for merging, a channel's mean minus what the
    merge makes its consumers read instead (`passes.compensate`).  None: nothing added.
    `consumer_shift`: consumer node -> C-vector, replacing `shift` for that consumer (consumers along a
    residual stream read the same channel at different depths, with different means)."""
    keep: np.ndarray
    fold: np.ndarray | None = None
    merge: np.ndarray | None = None
    shift: np.ndarray | None = None
    consumer_shift: dict[str, np.ndarray] = field(default_factory=dict)

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
        if self.shift is not None:
            self.shift = np.asarray(self.shift, dtype=np.float64)
        self.consumer_shift = {node: np.asarray(v, dtype=np.float64) for node, v in self.consumer_shift.items()}
        for vector in [self.shift, *self.consumer_shift.values()]:
            if vector is not None and (vector.ndim != 1 or not np.isfinite(vector).all()):
                raise ValueError("a shift is a finite vector with one value per channel of the group")

    def shift_for(self, consumer: str) -> np.ndarray | None:
        """The shift a consumer node applies (its own, else the group's)."""
        return self.consumer_shift.get(consumer, self.shift)

    @property
    def merges(self) -> bool:
        """Are removed channels folded into kept ones (a `fold` or `merge` matrix), not only dropped?"""
        return self.fold is not None or self.merge is not None

    def reduces(self, size: int) -> bool:
        """Does the plan change a group of `size` channels (drop or merge any)?"""
        return len(self.keep) < size or self.merges

    @property
    def shifts(self) -> bool:
        return any(v is not None and np.any(v != 0) for v in [self.shift, *self.consumer_shift.values()])


@dataclass
class Plan:
    groups: dict[int, GroupPlan] = field(default_factory=dict)  # group id -> plan; absent = keep all

    def removes_anything(self, sizes: dict[int, int]) -> bool:
        return any(p.reduces(sizes[g]) or p.shifts
                   for g, p in self.groups.items())

    def to_json(self) -> str:
        def listed(matrix):
            return None if matrix is None else matrix.tolist()

        def entry(p: GroupPlan) -> dict:
            out = {"keep": p.keep.tolist(), "fold": listed(p.fold), "merge": listed(p.merge)}
            if p.shift is not None:
                out["shift"] = p.shift.tolist()
            if p.consumer_shift:
                out["consumer_shift"] = {node: v.tolist() for node, v in sorted(p.consumer_shift.items())}
            return out
        return json.dumps({str(g): entry(p) for g, p in sorted(self.groups.items())}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        def array(value):
            return None if value is None else np.array(value)
        return cls({int(g): GroupPlan(np.array(p["keep"]), array(p.get("fold")), array(p.get("merge")),
                                      array(p.get("shift")),
                                      {n: np.array(v) for n, v in (p.get("consumer_shift") or {}).items()})
                    for g, p in raw.items()})
