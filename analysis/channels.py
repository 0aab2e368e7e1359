"""Channel-equivalence groups of an ONNX graph.

Every channel a producer (Conv, Gemm, MatMul with constant weights) creates gets a global integer id.  Op rules
(`analysis.rules.RULES`) walk the graph once, in order, and give each tensor a `Layout`: the axis that holds
channels and the id at every position along it.  Rules tie ids together (`tie`, e.g. the two inputs of an Add),
record the weights that must change with a channel (`Member`s), and freeze ids they do not understand, with a
reason.  At the end the ids are partitioned:

- a *channel* (class) is a connected component of tied ids: the unit that is kept or removed;
- a *group* is a connected component of channels that share a producer: the unit a Plan addresses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnx_prune.runtime.shapes import infer_shapes



@dataclass
class Layout:
    """Where a tensor keeps its channels: `ids[p]` is the channel id at position p of `axis`."""
    axis: int
    ids: np.ndarray


@dataclass(frozen=True)
class Elem:
    """One element of a tracked 1-D shape tensor (the output of Shape and what is computed from it).

    kind: 'const' (from an initializer), 'chan' (computed from the runtime channel count of `ids`: `value`
    now, `scale` times that count), 'other' (batch, spatial sizes, anything that does not depend on
    pruning).  `value` is its size when known (batch as 1).
    """
    kind: str
    value: int | None
    source: tuple | None = None  # const: (node name, input index, element index)
    ids: np.ndarray | None = None  # chan: the channel ids counted
    scale: float = 1.0  # chan: value / len(ids), e.g. 0.5 for C // 2
    batch: bool = False  # other: the open leading dim of a tensor (the batch), `value` 1 only as a stand-in


@dataclass
class CountConstraint:
    """A shape value computed at run time must equal a count after any pruning:
    scale * kept(counted) == kept(positions).  Checked once channels are known; frozen if it can fail."""
    counted: np.ndarray
    scale: float
    positions: np.ndarray
    reason: str


@dataclass
class RawMember:
    role: str          # producer | carrier | consumer
    node: str
    param: str         # initializer name
    axis: int
    ids: np.ndarray    # channel id at each position along `axis` of `param`


@dataclass
class ShapeEdit:
    """An integer that must become the number of kept positions among `ids` after pruning.

    target: ('input', node, input index, element) for a constant tensor input, or ('attr', node, name, element)
    for an attribute (a Conv's `group`, a Split's sizes).
    """
    target: tuple
    ids: np.ndarray
    computed: tuple | None = None  # the whole vector's values now, when the input is computed, not constant


@dataclass
class Member:
    """A weight slice one group owns: positions along `axis` of `param`, each mapped to a channel of the group."""
    role: str
    node: str
    param: str
    axis: int
    positions: np.ndarray
    channels: np.ndarray

    def to_dict(self) -> dict:
        return {"role": self.role, "node": self.node, "param": self.param, "axis": self.axis,
                "positions": len(self.positions)}


@dataclass
class Group:
    """C channels that are removed or merged together, with every weight slice that must change with them."""
    id: int
    size: int
    members: list[Member]
    frozen: np.ndarray            # bool per channel
    reasons: list[str]            # why channels are frozen, deduplicated
    name: str = ""                # the first producer node, for people

    @property
    def prunable(self) -> int:
        """How many channels may go (frozen ones stay)."""
        return int(self.size - self.frozen.sum())

    def by_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def nodes(self, role: str) -> list[str]:
        return sorted({m.node for m in self.by_role(role)})


@dataclass
class ChannelAnalysis:
    groups: list[Group]
    id_group: np.ndarray          # global id -> group id
    id_channel: np.ndarray        # global id -> channel index inside its group
    param_ids: dict[tuple[str, int], np.ndarray]   # (param, axis) -> ids along that axis
    param_roles: dict[tuple[str, int], str]        # (param, axis) -> producer | carrier | consumer
    shape_edits: list[ShapeEdit]
    layouts: dict[str, Layout]
    node_ops: dict[str, str] = field(default_factory=dict)

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable > 0 and g.size > 1]


class Context:
    """What op rules read and write while the graph is walked."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list | None] | None = None):
        graph = model.graph
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.inits = {t.name: t for t in graph.initializer}
        self.shapes = shapes if shapes is not None else infer_shapes(model)
        self.layouts: dict[str, Layout] = {}
        self.shapevecs: dict[str, list[Elem]] = {}
        self.next_id = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.producer_ids: list[np.ndarray] = []   # ids born together (one producer output): one group
        self.members: list[RawMember] = []
        self.shape_edits: list[ShapeEdit] = []
        self.count_constraints: list[CountConstraint] = []
        self.param_ids: dict[tuple[str, int], np.ndarray] = {}
        self.claimed: set[tuple[str, int]] = set()  # (node name, input index) whose use of a weight is understood
        self._values: dict[str, np.ndarray] = {}
        # values of small computed tensors (shape computations) under SCENARIOS of the dims that may vary: the
        # channel counts pruning changes and the dims the model leaves open; an element equal in every scenario
        # depends on neither
        self.variants: dict[str, list[np.ndarray]] = {}

    # --- reading the graph
    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer (None for a computed tensor or an empty name)."""
        if not name or name not in self.inits:
            return None
        if name not in self._values:
            self._values[name] = numpy_helper.to_array(self.inits[name])
        return self._values[name]

    def invariant(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A computed tensor's value, and which of its elements depend neither on channel counts nor on open
        dims (equal in every scenario); None when it is not a tracked computation."""
        runs = self.variants.get(name)
        if runs is None or any(r.shape != runs[0].shape for r in runs):
            return None
        same = np.ones(runs[0].shape, dtype=bool)
        for other in runs[1:]:
            same &= other == runs[0]
        return runs[0], same

    def is_const(self, name: str) -> bool:
        return bool(name) and name in self.inits

    def dims(self, name: str) -> list | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        return self.shapes.get(name)

    def layout(self, name: str) -> Layout | None:
        return self.layouts.get(name) if name else None

    # --- writing
    def set_layout(self, name: str, axis: int, ids: np.ndarray) -> None:
        self.layouts[name] = Layout(int(axis), np.asarray(ids, dtype=np.int64))

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        self.producer_ids.append(ids)
        return ids

    def fresh_frozen(self, n: int, reason: str) -> np.ndarray:
        ids = self.fresh(n)
        self.freeze(ids, reason)
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channels a[i] and b[i] must be kept or removed together."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            raise ValueError(f"tie of {a.shape} and {b.shape} ids")
        self.edges.append((a, b))

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size:
            self.frozen.append((ids, reason))

    def freeze_tensor(self, name: str, reason: str) -> None:
        """Freeze every channel a tensor (or a shape vector computed from it) carries."""
        lay = self.layouts.get(name)
        if lay is not None:
            self.freeze(lay.ids, reason)
        for elem in self.shapevecs.get(name, ()):
            if elem.kind == "chan":
                self.freeze(elem.ids, reason)

    def member(self, role: str, node: onnx.NodeProto, input_index: int, axis: int, ids: np.ndarray) -> None:
        """Record that `axis` of the weight at `node.input[input_index]` follows channels `ids`."""
        param = node.input[input_index]
        ids = np.asarray(ids, dtype=np.int64)
        axis = axis % max(len(self.inits[param].dims), 1)
        key = (param, axis)
        if key in self.param_ids:
            self.tie(self.param_ids[key], ids)  # a weight shared by several nodes is one member
        else:
            self.param_ids[key] = ids
        self.claimed.add((node.name, input_index))
        self.members.append(RawMember(role, node.name, param, axis, ids))

    def shape_edit(self, target: tuple, ids: np.ndarray, computed: tuple | None = None) -> None:
        self.shape_edits.append(ShapeEdit(target, np.asarray(ids, dtype=np.int64), computed))


def analyze_channels(model: onnx.ModelProto, shapes: dict[str, list | None] | None = None) -> ChannelAnalysis:
    """Walk `model` (normalised, topologically sorted) with the op-rule table and build its groups."""
    from onnx_prune.analysis.rules import apply_rule, freeze_outer_scope_uses

    ctx = Context(model, shapes)
    graph = model.graph
    node_ops = {}
    for node in graph.node:
        node_ops[node.name] = node.op_type
        apply_rule(ctx, node)
        freeze_outer_scope_uses(ctx, node)
    for out in graph.output:
        ctx.freeze_tensor(out.name, f"reaches graph output '{out.name}' (outputs keep their shapes)")
    _freeze_unclaimed_weights(ctx, graph)
    return _partition(ctx, node_ops)


def _freeze_param(ctx: Context, name: str, reason: str) -> None:
    for (param, _axis), ids in ctx.param_ids.items():
        if param == name:
            ctx.freeze(ids, reason)


def _freeze_unclaimed_weights(ctx: Context, graph: onnx.GraphProto) -> None:
    """A weight that some node uses in a way no rule understood cannot be sliced; nor can one the graph
    shows to the outside: a graph output keeps its shape, and a graph input (an overridable initializer,
    as `keep_initializers_as_inputs` exports write every weight) may be replaced at run time by a tensor of
    its declared shape."""
    owned = {m.param for m in ctx.members}
    for out in graph.output:
        if out.name in owned:
            _freeze_param(ctx, out.name, f"weight '{out.name}' is a graph output (outputs keep their shapes)")
    for value in graph.input:
        if value.name in owned:
            _freeze_param(ctx, value.name, f"weight '{value.name}' is also a graph input, which may replace it "
                                           "at run time (re-export without keep_initializers_as_inputs to prune it)")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in owned and (node.name, i) not in ctx.claimed:
                _freeze_param(ctx, name, f"weight '{name}' is also read by {node.op_type} node '{node.name}'")
    read_inside = set().union(*(subgraph_reads(n) for n in graph.node))
    for name in sorted(read_inside & owned):
        _freeze_param(ctx, name, f"weight '{name}' is read inside a subgraph")


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + \
        [g for a in node.attribute for g in a.graphs]


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names that a node's If/Loop/Scan bodies read, at any depth."""
    names: set[str] = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(inner.input)
            names |= subgraph_reads(inner)
    return names


def _components(n: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    if not pairs:
        return np.arange(n)
    rows = np.concatenate([a for a, _ in pairs])
    cols = np.concatenate([b for _, b in pairs])
    adjacency = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    return labels


def _holds(constraint: CountConstraint, channel_of: np.ndarray, n_channels: int) -> bool:
    """Whatever channels go, does scale * kept(counted) stay equal to kept(positions)?  It does exactly when
    every channel occurs `1 / scale` times as often among `counted` as among `positions`."""
    counted = np.bincount(channel_of[constraint.counted], minlength=n_channels)
    positions = np.bincount(channel_of[constraint.positions], minlength=n_channels)
    return bool(np.allclose(counted * constraint.scale, positions))


def _first_occurrence_order(labels: np.ndarray) -> np.ndarray:
    """Relabel components 0, 1, … in the order their smallest id appears (deterministic, reads naturally)."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first, kind="stable")
    relabel = np.empty(len(order), dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return relabel[np.searchsorted(np.unique(labels), labels)]


def _keep_every_tensor_nonempty(ctx: Context, id_group: np.ndarray, id_channel: np.ndarray, sizes: np.ndarray,
                                frozen: list[np.ndarray], reasons: list[list[str]]) -> None:
    """No tensor or weight may lose all its channels.  A plan never empties a group, but a tensor can hold only
    some of a group's channels: a stem padded with zero channels into a residual sum (BlazeFace) shares its
    group with the padding, which is frozen, so keeping "the frozen ones" would empty the stem and every
    depthwise conv and bias on it.  Where a tensor holds no frozen channel and no whole group, one of its
    channels (the first) is frozen, so whatever a method selects, the tensor keeps at least it."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate(frozen) if frozen else np.zeros(0, dtype=bool)
    named = [(name, lay.ids) for name, lay in ctx.layouts.items()] + [(m.param, m.ids) for m in ctx.members]
    guarded: dict[int, list[str]] = {}
    seen: set[bytes] = set()
    for name, ids in named:
        key = ids.tobytes()
        if not len(ids) or key in seen:  # pass-through ops repeat the same ids many times
            continue
        seen.add(key)
        slots = offsets[id_group[ids]] + id_channel[ids]
        if flat[slots].any():
            continue
        unique = np.unique(slots)
        groups_here, counts = np.unique(_groups_of(unique, offsets), return_counts=True)
        if (counts == sizes[groups_here]).any():
            continue  # it holds a whole group, which a plan never empties
        g, c = int(id_group[ids[0]]), int(id_channel[ids[0]])
        flat[offsets[g] + c] = True
        frozen[g][c] = True
        guarded.setdefault(g, []).append(name)
    for g, names in guarded.items():
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        reasons[g].append(f"{len(names)} channel(s) kept so that tensors holding part of the group ({shown}) "
                          "never lose all their channels")


def _groups_of(slots: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The group of each flat (group offset + channel) slot."""
    return np.searchsorted(offsets, slots, side="right") - 1


def _partition(ctx: Context, node_ops: dict[str, str]) -> ChannelAnalysis:
    n = ctx.next_id
    channel_of = _first_occurrence_order(_components(n, ctx.edges))
    # Channels born in one producer output belong to one group.
    sibling_pairs = [(ids[:-1], ids[1:]) for ids in ctx.producer_ids if len(ids) > 1]
    channel_pairs = [(channel_of[a], channel_of[b]) for a, b in sibling_pairs]
    n_channels = int(channel_of.max()) + 1 if n else 0
    group_of_channel = _first_occurrence_order(_components(n_channels, channel_pairs))
    id_group = group_of_channel[channel_of] if n else np.zeros(0, dtype=np.int64)

    # channel index inside the group, in order of first appearance
    n_groups = int(group_of_channel.max()) + 1 if n_channels else 0
    id_channel = np.zeros(n, dtype=np.int64)
    sizes = np.zeros(n_groups, dtype=np.int64)
    index_of_channel = np.zeros(n_channels, dtype=np.int64)
    for c in range(n_channels):  # channels are already numbered in first-appearance order
        g = group_of_channel[c]
        index_of_channel[c] = sizes[g]
        sizes[g] += 1
    if n:
        id_channel = index_of_channel[channel_of]

    for constraint in ctx.count_constraints:
        if not _holds(constraint, channel_of, n_channels):
            ctx.freeze(np.concatenate([constraint.counted, constraint.positions]), constraint.reason)
    frozen = [np.zeros(int(s), dtype=bool) for s in sizes]
    reasons: list[list[str]] = [[] for _ in range(n_groups)]
    for ids, reason in ctx.frozen:
        for g in np.unique(id_group[ids]):
            sel = ids[id_group[ids] == g]
            frozen[g][id_channel[sel]] = True
            if reason not in reasons[g]:
                reasons[g].append(reason)
    _keep_every_tensor_nonempty(ctx, id_group, id_channel, sizes, frozen, reasons)

    members: list[list[Member]] = [[] for _ in range(n_groups)]
    for raw in ctx.members:
        groups_here = id_group[raw.ids]
        for g in np.unique(groups_here):
            positions = np.nonzero(groups_here == g)[0]
            members[g].append(Member(raw.role, raw.node, raw.param, raw.axis, positions,
                                     id_channel[raw.ids[positions]]))
    groups = []
    for g in range(n_groups):
        producers = [m.node for m in members[g] if m.role == "producer"]
        groups.append(Group(g, int(sizes[g]), members[g], frozen[g], reasons[g],
                            producers[0] if producers else ""))
    roles = {(m.param, m.axis): m.role for m in ctx.members}
    return ChannelAnalysis(groups, id_group, id_channel, ctx.param_ids, roles, ctx.shape_edits, ctx.layouts,
                           node_ops)
