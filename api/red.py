"""RED (METHODS.md §2) as a function: `onnx_prune.red(model, ...)` is `prune(model, method="red", ...)`.

    model, report = red("in.onnx")                          # hash + merge duplicates + separate
    model, report = red("in.onnx", target_macs=0.5)         # ... to 50 % of the MACs
    model, report = red("in.onnx", merge=False)             # hashing alone (`--method hash`)

The method itself (BatchNorm folding and hashing before, one Plan for merging and pruning, uneven depthwise
separation after) lives in `onnx_prune.methods.RedMethod`; the report is a `PruneReport` like every method's,
with RED's steps in `report.details` ("HashWeightsPass", "merge", "pruned", "SeparateDepthwisePass").
"""
from __future__ import annotations

import onnx

from onnx_prune.options import PruneOptions
from onnx_prune.pipeline import ModelLike, Prepared, PruneReport, prune

# `--method` presets: RED as a whole, and hashing alone
METHOD_PRESETS = {"red": {}, "hash": {"merge": False}}


def red(model: "ModelLike | Prepared", options: PruneOptions | None = None, *, merge: bool = True,
        merge_to_target: bool = True, **kwargs) -> tuple[onnx.ModelProto, PruneReport]:
    """RED on `model`; keywords are `PruneOptions` fields.  `merge=False` hashes only; `merge_to_target=False`
    merges at `merge_tol` and prunes the rest instead of raising the tolerance towards the target."""
    kwargs["method"] = "red" if merge else "hash"
    if not merge_to_target:
        kwargs["max_merge_tol"] = kwargs.get("merge_tol", (options or PruneOptions()).merge_tol)
    return prune(model, options, **kwargs)
