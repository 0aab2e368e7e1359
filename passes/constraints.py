"""What every method must honour: one target and the limits on how groups may shrink.

A method either honours each field of `Constraints` or refuses it by name (`Method.refuses`); it never
ignores one.  Targets are fractions of the *original* model (MACs, parameters, measured latency) or a share of
channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import onnx

from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.errors import PruneError

TARGET_KINDS = ("ratio", "macs", "params", "latency")


@dataclass(frozen=True)
class Target:
    ratio: float | None = None          # share of channels to remove
    macs: float | None = None           # fraction of MACs to keep
    params: float | None = None         # fraction of parameters to keep
    latency: float | None = None        # fraction of the measured latency to keep

    @property
    def kind(self) -> str | None:
        """Which target this is (None: no target, e.g. RED merging only what is redundant)."""
        return next((k for k in TARGET_KINDS if getattr(self, k) is not None), None)

    @property
    def value(self) -> float | None:
        return None if self.kind is None else getattr(self, self.kind)

    def describe(self) -> str:
        if self.kind is None:
            return "no target"
        if self.kind == "ratio":
            return f"remove {self.ratio:.0%} of channels"
        noun = {"macs": "MACs", "params": "parameters", "latency": "latency"}[self.kind]
        return f"keep {self.value:.0%} of {noun}"


ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")  # how a target is spread (auto: see constraints_of)


@dataclass(frozen=True)
class Constraints:
    """The target plus what may not change: honoured by every method (or refused by name)."""
    target: Target = field(default_factory=Target)
    exclude: tuple[str, ...] = ()       # node names (shell wildcards): their output channels stay whole
    protect_first: bool = False         # also keep whole the groups of layers reading a graph input
    round_to: int | str = "size"        # kept counts rounded up to a multiple of this, per group ("size") or
                                        # to the latency table's fastest widths ("auto"): passes.allocate
    max_ratio: float = 1.0              # at most this share of any group goes
    allocation: str = "uniform"         # one of ALLOCATIONS

    # the fields a method may refuse, by the name users know them (`Method.refuses` keys)
    NAMES = ("target", "exclude", "protect_first", "round_to", "max_ratio", "allocation")

    def given(self) -> list[str]:
        """The constraints that differ from "no constraint" (what a method must honour or refuse)."""
        out = ["target"] if self.target.kind is not None else []
        # a rounding of 1 or the default "size" asks nothing of a method that removes no channel
        unset = {"exclude": ((),), "protect_first": (False,), "round_to": (1, "size"), "max_ratio": (1.0,),
                 "allocation": ("uniform", "auto")}
        out += [name for name in self.NAMES[1:] if getattr(self, name) not in unset[name]]
        return out

    def excluded_groups(self, model: onnx.ModelProto, analysis: ChannelAnalysis) -> set[int]:
        """Groups that must stay whole: written by an excluded node, or by the stem with `protect_first`."""
        patterns = list(self.exclude) + (input_stem_nodes(model) if self.protect_first else [])
        return excluded_groups(analysis, patterns)


def input_stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that read a graph input directly (the first conv of a CNN)."""
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] in inputs]


def excluded_groups(analysis: ChannelAnalysis, patterns: list[str]) -> set[int]:
    """Groups whose channels a node matching one of `patterns` writes (shell-style wildcards).

    Only producers and carriers count: excluding a layer keeps its output channels, not its input."""
    known = set(analysis.node_ops)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in known):
            raise PruneError(f"--exclude {pattern}: no node of the model has that name")
    return {g.id for g in analysis.groups
            if any(fnmatchcase(m.node, p) for m in g.members if m.role != "consumer" for p in patterns)}
