"""Saliency of every channel of a group: every criterion, the data-free ones and those measured on calibration data.

A *criterion* scores the filters of one layer: rows of a matrix (one row per output position, bias as the last
column).  A BatchNormalization after the layer enters as a factor |gamma| on the raw filters' scores (bn_mode
"gamma", the default) or folded into the rows ("folded": gamma / running sigma, which inflates nearly dead
channels); either way it is part of its layer, never a layer of its own.  An *aggregation* turns the scores
of all the layers a group touches into one score per channel (METHODS.md §1):

- ``first``: the group's first producer only (coupling-blind, the baseline Domino improves on);
- ``domino-o``: sum over every producer and every filter carried along (depthwise convs);
- ``domino-io``: ``domino-o`` plus the consumers' input slices;
- ``mean`` / ``max``: over the producers.

``normalize`` divides by the number of weights a channel's removal deletes (the paper's "-avg" variants).
Higher scores mean more important.

``bnvar`` is a group-level criterion: the variance of what each consumer reads (from the BatchNorm statistics
through the activation, or measured) times the consumer's squared weights -- the output error of removing the
channel once compensation puts its mean in the consumers' biases.  Its scores share units across groups
(`comparable_across_groups`).  ``similarity`` / ``nystrom``: distance to the nearest filter prototype, exact or
through the Nystrom approximation (landmarks default to the prototypes' rank; the measured error is noted).

Calibration criteria (`CALIBRATION_CRITERIA`: ``activation``, ``apoz``) score what a group's consumers read on
calibration data; `calibration_scores` has the model run for them by `runtime.activations` (imported on first
use).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper
from scipy.linalg import qr
from scipy.spatial import cKDTree

from onnx_prune.analysis.channels import Group, Member

Weights = Callable[[str], np.ndarray]  # initializer name -> array


@dataclass
class FilterSet:
    """One layer's filters inside a group: `rows[p]` is the filter at position p, `kernel` its k*k size."""
    node: str
    role: str
    rows: np.ndarray        # (positions, features), float64
    positions: np.ndarray   # positions along the layer's channel axis
    channels: np.ndarray    # group channel of each position
    kernel: int = 1         # spatial size of a filter (1 for 1x1 convs and Gemm/MatMul)
    weights_per_position: int = 0
    factor: np.ndarray | None = None  # per-position multiplier of the scores (|gamma| with bn_mode "gamma")

    def by_channel(self, size: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(size, occurrences x features): each group channel's rows (`rows`, default `self.rows`, one per
        position) side by side in position order where the layer holds the channel at several positions (a
        grouped conv repeats it in every conv group); zeros for channels the layer does not touch."""
        rows = self.rows if rows is None else rows
        order = np.lexsort((self.positions, self.channels))
        channels = self.channels[order]
        slot = np.arange(len(channels)) - np.searchsorted(channels, channels)  # occurrence among its positions
        block = np.zeros((size, int(slot.max(initial=0)) + 1, rows.shape[1]))
        block[channels, slot] = rows[order]
        return block.reshape(size, -1)


# --- criteria: filters (n, d) -> score (n,)

def l1(filters: FilterSet, **_) -> np.ndarray:
    return np.abs(filters.rows).sum(axis=1)


def l2(filters: FilterSet, **_) -> np.ndarray:
    return np.sqrt(row_energy(filters.rows))


def fpgm(filters: FilterSet, **_) -> np.ndarray:
    """Sum of distances to the other filters: near the geometric median = replaceable = low score."""
    rows = filters.rows
    sq = (rows ** 2).sum(axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    return np.sqrt(dist2).sum(axis=1)


def random_scores(filters: FilterSet, rng: np.random.Generator | None = None, **_) -> np.ndarray:
    return (rng or np.random.default_rng(0)).random(len(filters.rows))


def prototypes(filters: FilterSet) -> np.ndarray:
    """Unit rank-1 prototype of each filter (METHODS.md §4): the first left singular vector of its
    (k*k, C_in) matrix.  For 1x1 filters that vector is a sign, so the whole normalised row is used."""
    rows = filters.rows[:, :-1] if filters.rows.shape[1] > 1 else filters.rows  # weights, not the bias column
    k = filters.kernel
    if k > 1 and rows.shape[1] % k == 0:
        per_filter = rows.reshape(len(rows), -1, k).transpose(0, 2, 1)  # (n, k*k, C_in)
        u, _, _ = np.linalg.svd(per_filter, full_matrices=False)
        proto = u[:, :, 0]
    else:
        proto = rows
    norms = np.linalg.norm(proto, axis=1, keepdims=True)
    return proto / np.where(norms > 0, norms, 1.0)


def nearest_exact(proto: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbour of each prototype and its cosine distance 1 - |cos|, from the exact similarities
    (computed block by block: no n x n matrix is held)."""
    return _blocked_nearest(proto)


def _blocked_nearest(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest other row by |cos| and its distance 1 - |cos|, for unit rows, by blocks of matrix products."""
    n = len(unit)
    rows = np.arange(n)
    neighbour, distance = np.empty(n, dtype=np.int64), np.empty(n)
    for begin in range(0, n, SEARCH_BLOCK):
        block = rows[begin:begin + SEARCH_BLOCK]
        cosine = np.abs(unit[block] @ unit.T)
        cosine[np.arange(len(block)), block] = -np.inf
        neighbour[block] = np.argmax(cosine, axis=1)
        distance[block] = np.clip(1.0 - cosine[np.arange(len(block)), neighbour[block]], 0.0, None)
    return neighbour, distance


RANK_TOLERANCE = 1e-7    # pivoted-QR diagonal below this share of the largest: beyond the numerical rank
KD_TREE_DIMS = 16        # factor widths up to which a k-d tree finds neighbours faster than a matrix product
SAMPLE_ROWS = 64         # filters whose exact neighbours measure a Nystrom approximation
SEARCH_BLOCK = 1024      # rows per block of the brute-force neighbour search


@dataclass
class NystromFit:
    """What a Nystrom neighbour search found and how far it is from exact.

    `rank` is the prototypes' numerical rank; with `landmarks` >= `rank` the approximation is exact (to
    rounding).  `agreement` (share of sampled filters whose neighbour is an exact nearest one) and
    `similarity_error` (relative Frobenius error of the sampled similarity rows) are measured on up to
    SAMPLE_ROWS evenly spaced filters against the exact similarity."""
    neighbour: np.ndarray
    distance: np.ndarray
    landmarks: int
    rank: int
    agreement: float
    similarity_error: float

    def summary(self) -> dict:
        return {"filters": len(self.neighbour), "rank": self.rank, "landmarks": self.landmarks,
                "exact": self.landmarks >= self.rank, "sampled_agreement": self.agreement,
                "sampled_similarity_error": self.similarity_error}


def pivoted_landmarks(proto: np.ndarray) -> tuple[np.ndarray, int]:
    """(rows in the order a pivoted QR picks them, numerical rank of the prototypes)."""
    _, r, pivots = qr(proto.T, mode="economic", pivoting=True)
    diagonal = np.abs(np.diag(r))
    rank = int((diagonal > diagonal[0] * RANK_TOLERANCE).sum()) if len(diagonal) and diagonal[0] > 0 else 1
    return pivots, max(rank, 1)


def nystrom_factor(proto: np.ndarray, landmarks: int | None = None) -> np.ndarray:
    """F with F F^T = the Nystrom approximation C W^+ C^T of the similarity matrix.  Landmarks are the rows a
    pivoted QR picks first; None takes the prototypes' numerical rank, which makes it exact."""
    return _factor(proto, *pivoted_landmarks(proto), landmarks)[0]


def _factor(proto: np.ndarray, pivots: np.ndarray, rank: int, landmarks: int | None) -> tuple[np.ndarray, int]:
    m = min(rank if landmarks is None else landmarks, len(proto))
    chosen = np.sort(pivots[:m])
    columns = proto @ proto[chosen].T                     # C: (n, m)
    w = columns[chosen]                                   # W: (m, m)
    vals, vecs = np.linalg.eigh(w)
    keep = vals > vals.max() * 1e-10
    return columns @ (vecs[:, keep] / np.sqrt(vals[keep])), m  # C W^{-1/2}


def _nearest_in_factor(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest other row by |cos| and its distance 1 - |cos|, for unit rows: a k-d tree in few dimensions,
    blocked matrix products otherwise."""
    if unit.shape[1] > KD_TREE_DIMS:
        return _blocked_nearest(unit)
    n = len(unit)
    rows = np.arange(n)
    tree = cKDTree(np.vstack([unit, -unit]))  # |cos| is largest for the nearest of f and -f
    chord, index = tree.query(unit, k=3, workers=-1)
    other = (index % n) != rows[:, None]  # drop the filter itself (at distance 0)
    pick = np.argmax(other, axis=1)
    return index[rows, pick] % n, np.clip(chord[rows, pick] ** 2 / 2, 0.0, None)  # chord^2 = 2 - 2|cos|


def nystrom_neighbours(proto: np.ndarray, landmarks: int | None = None) -> NystromFit:
    """Nearest neighbours by |cos| through the Nystrom factor, with the approximation measured (NystromFit).
    ``landmarks=None`` (the default) takes the prototypes' numerical rank: exact, and fast where that rank is
    small (3x3 kernels: at most 9); for high-rank prototypes (1x1 convs) it costs about what exact does."""
    pivots, rank = pivoted_landmarks(proto)
    factor, m = _factor(proto, pivots, rank, landmarks)
    norms = np.linalg.norm(factor, axis=1, keepdims=True)
    unit = factor / np.where(norms > 0, norms, 1.0)
    neighbour, distance = _nearest_in_factor(unit)
    sample = np.unique(np.linspace(0, len(proto) - 1, min(SAMPLE_ROWS, len(proto))).astype(np.int64))
    exact = np.abs(proto[sample] @ proto.T)
    approx = np.abs(unit[sample] @ unit.T)
    exact[np.arange(len(sample)), sample] = approx[np.arange(len(sample)), sample] = 0.0
    best = exact.max(axis=1)
    agreement = float(np.mean(exact[np.arange(len(sample)), neighbour[sample]] >= best - 1e-9))
    error = float(np.linalg.norm(exact - approx) / max(np.linalg.norm(exact), 1e-30))
    return NystromFit(neighbour, distance, m, rank, agreement, error)


def nearest_nystrom(proto: np.ndarray, landmarks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour, distance) of `nystrom_neighbours`."""
    fit = nystrom_neighbours(proto, landmarks)
    return fit.neighbour, fit.distance


def similarity(filters: FilterSet, **_) -> np.ndarray:
    """Distance to the most similar other filter: a filter with a near-twin is redundant."""
    if len(filters.rows) < 2:
        return np.ones(len(filters.rows))
    return nearest_exact(prototypes(filters))[1]


def nystrom(filters: FilterSet, landmarks: int | None = None, notes: dict | None = None, **_) -> np.ndarray:
    """`similarity` through the Nystrom approximation; the fit's measured error goes to `notes[node]`."""
    if len(filters.rows) < 2:
        return np.ones(len(filters.rows))
    fit = nystrom_neighbours(prototypes(filters), landmarks)
    if notes is not None:
        notes.setdefault("nystrom", {})[filters.node] = fit.summary()
    return fit.distance


CRITERIA: dict[str, Callable[..., np.ndarray]] = {
    "l1": l1, "l2": l2, "fpgm": fpgm, "random": random_scores, "similarity": similarity, "nystrom": nystrom,
}
BN_CRITERION = "bn"  # |gamma| of the BatchNormalizations on each channel (l2 where a group has none)
VARIANCE_CRITERION = "bnvar"  # Var[what consumers read] x their squared weights: output error after compensation
CRITERION_NAMES = tuple(CRITERIA) + (BN_CRITERION, VARIANCE_CRITERION)
COMPARABLE_ACROSS_GROUPS = frozenset({VARIANCE_CRITERION})


# --- criteria measured on calibration data: `values` holds, per position of the channel axis of a tensor a
# group's consumers read, its values over every sample and pixel

def mean_activation(values: np.ndarray) -> np.ndarray:
    """``activation``: mean |activation| (high = keep)."""
    return np.abs(values).mean(axis=1)


def apoz(values: np.ndarray) -> np.ndarray:
    """``apoz``: 1 - average percentage of zeros (a channel that is mostly 0 after a Relu goes first)."""
    return 1 - (values == 0).mean(axis=1)


MEASURED_CRITERIA: dict[str, Callable[[np.ndarray], np.ndarray]] = {"activation": mean_activation, "apoz": apoz}
CALIBRATION_CRITERIA = tuple(MEASURED_CRITERIA)


def calibration_scores(model: onnx.ModelProto, analysis, group_ids, inputs: list[dict],
                       criterion: str) -> dict[int, np.ndarray]:
    """Per-channel scores of a calibration criterion for the groups that have an observable consumer input
    (the others are left out: callers fall back to l2), measured by running `model` on `inputs` (feed dicts)."""
    from onnx_prune.runtime.activations import measured_scores

    return measured_scores(model, analysis, group_ids, inputs, MEASURED_CRITERIA[criterion])


def comparable_across_groups(criterion: str) -> bool:
    """Are `criterion`'s scores in the same units in every group?  bnvar's are (the expected squared error it
    adds to the consumers' outputs), so global allocation can rank channels of different groups directly;
    the others need their group's scale divided out ("score / group mean")."""
    return criterion in COMPARABLE_ACROSS_GROUPS
AGGREGATIONS = ("first", "domino-o", "domino-io", "mean", "max")


# --- filters of a group, BatchNorm folded

def batchnorm_after(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv/Gemm/MatMul node name -> the BatchNormalization that alone reads its output."""
    from onnx_prune.analysis.layers import readers_of

    readers = readers_of(model)
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.output[0] not in outputs:
            after = readers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "BatchNormalization" and after[0].input[0] == node.output[0]:
                found[node.name] = after[0]
    return found


def _bn_affine(bn: onnx.NodeProto, weights: Weights) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with BN(x) = scale * x + shift."""
    eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (weights(n).astype(np.float64) for n in bn.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def weight_shape(weights: Weights, name: str) -> tuple[int, ...]:
    """The shape of weight `name`: from the reader's `shape` (the initializer's dims, nothing decoded) where it
    has one (`runtime.io.WeightReader`), else from the decoded array (plain callables, in tests)."""
    shape = getattr(weights, "shape", None)
    return tuple(shape(name)) if callable(shape) else weights(name).shape


def _rows(member: Member, weights: Weights) -> np.ndarray:
    """The member's positions as rows (positions, features), in the weight's own type: callers widen them to
    float64 where they store them (one float64 copy of a large weight, not three)."""
    array = weights(member.param)
    size, positions = array.shape[member.axis], member.positions
    if not (len(positions) == size and np.array_equal(positions, np.arange(size))):
        array = np.take(array, positions, axis=member.axis)
    return np.moveaxis(array, member.axis, 0).reshape(len(positions), -1)


def _with_bias(rows: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 [rows | bias], filled in place (`np.column_stack` of float64 rows, without their extra copy)."""
    table = np.empty((len(rows), rows.shape[1] + 1))
    table[:, :-1] = rows
    table[:, -1] = bias
    return table


ENERGY_BLOCK = 256  # rows squared at a time: the squares of a large layer are never held whole


def row_energy(rows: np.ndarray) -> np.ndarray:
    """(rows ** 2).sum(axis=1), block by block (the same sums: each row is reduced alone)."""
    out = np.empty(len(rows))
    for begin in range(0, len(rows), ENERGY_BLOCK):
        out[begin:begin + ENERGY_BLOCK] = (rows[begin:begin + ENERGY_BLOCK] ** 2).sum(axis=1)
    return out


BN_MODES = ("folded", "gamma")  # how a BatchNorm after a layer enters its filters' scores


def filter_sets(group: Group, weights: Weights, roles: tuple[str, ...] = ("producer",),
                bn_after: dict[str, onnx.NodeProto] | None = None, bn_mode: str = "folded",
                batchnorms: dict[str, onnx.NodeProto] | None = None) -> list[FilterSet]:
    """The group's layers of the given roles, each with weight (and bias) rows per position.

    A BatchNorm that alone reads a producer or a carried (depthwise) conv is part of that layer: with
    ``bn_mode="folded"`` its affine is folded into the rows (what the runtime computes), with ``"gamma"`` the
    raw rows are kept and |gamma| multiplies the layer's scores (`FilterSet.factor`), leaving out the 1/sigma
    that folding brings.  Either way that BatchNorm is not a layer of its own (it would count twice, in other
    units).  A BatchNorm that reads something else (an Add, a concat) stays a carrier, as its affine
    [gamma / sigma, beta - mean * gamma / sigma] where `batchnorms` names it."""
    bn_after = bn_after or {}
    batchnorms = batchnorms or {}
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode '{bn_mode}' (choose from {', '.join(BN_MODES)})")
    in_a_layer = {bn.name for bn in bn_after.values()}
    by_node: dict[tuple[str, str], list[Member]] = {}
    for member in group.members:
        if member.role in roles and not (member.role == "carrier" and member.node in in_a_layer):
            by_node.setdefault((member.node, member.role), []).append(member)
    sets = []
    for (node, role), members in by_node.items():
        rank = {m.param: len(weight_shape(weights, m.param)) for m in members}  # read without decoding
        weight = max(members, key=lambda m: rank[m.param])
        if rank[weight.param] < 2 and role != "carrier":
            continue  # a bias alone
        if node in batchnorms and role == "carrier":
            sets.append(_batchnorm_carrier(batchnorms[node], members, weights))
            continue
        same = [m for m in members if np.array_equal(m.positions, weight.positions)]
        rows = _rows(weight, weights)
        bias = next((_rows(m, weights)[:, 0].astype(np.float64) for m in same
                     if m is not weight and rank[m.param] == 1), np.zeros(len(rows)))
        factor = None
        if node in bn_after and role in ("producer", "carrier"):
            bn = bn_after[node]
            if bn_mode == "folded":
                scale, shift = _bn_affine(bn, weights)
                rows = rows * scale[weight.positions, None]
                bias = bias * scale[weight.positions] + shift[weight.positions]
            else:
                factor = np.abs(weights(bn.input[1]).astype(np.float64))[weight.positions]
        shape = weight_shape(weights, weight.param)
        kernel = int(np.prod(shape[2:])) if len(shape) > 2 and weight.axis in (0, 1) else 1
        per_position = sum(int(np.prod(weight_shape(weights, m.param))) // weight_shape(weights, m.param)[m.axis]
                           for m in members)
        sets.append(FilterSet(node, role, _with_bias(rows, bias), weight.positions, weight.channels, kernel,
                              per_position, factor))
    return sets


def _batchnorm_carrier(bn: onnx.NodeProto, members: list[Member], weights: Weights) -> FilterSet:
    """A BatchNorm carried along a group as one 'layer': rows [scale, shift] of its affine."""
    scale_member = next((m for m in members if m.param == bn.input[1]), members[0])
    scale, shift = _bn_affine(bn, weights)
    positions = scale_member.positions
    rows = np.column_stack([scale[positions], shift[positions]])
    return FilterSet(bn.name, "carrier", rows, positions, scale_member.channels, 1, len(members))


def _accumulate(size: int, filters: FilterSet, scores: np.ndarray) -> np.ndarray:
    out = np.zeros(size)
    np.add.at(out, filters.channels, scores)
    return out


@dataclass
class Scoring:
    """What criteria read besides the group: weights, the BatchNorms of the graph, seed, Nystrom landmarks
    (None: the prototypes' rank), how BatchNorm enters the filters (`BN_MODES`; "gamma" by default: on the
    pretrained MobileNetV2 with BatchNorm kept, raw filters x |gamma| beat BN-folded ones for l1, l2 and fpgm
    at 90% of MACs, benchmarks/results/bnvar_quality.md), and for bnvar the statistics
    of what each group's consumers read (`analysis.expected.channel_statistics`: a dict by group id, or a
    zero-argument callable computing it, called once on first use).  `notes` collects what the criteria
    measured on the way (``notes["nystrom"][layer]``: the approximation's rank, landmarks and measured error;
    ``notes["bnvar"]``: where the statistics came from per group), for the report."""
    weights: Weights
    bn_after: dict[str, onnx.NodeProto]     # layer -> the BatchNormalization that alone reads it
    batchnorms: dict[str, onnx.NodeProto]   # every BatchNormalization node by name
    seed: int = 0
    landmarks: int | None = None
    bn_mode: str = "gamma"
    statistics: "dict | Callable[[], dict] | None" = None
    notes: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto, weights: Weights, seed: int = 0, landmarks: int | None = None,
           bn_mode: str = "gamma", statistics: "dict | Callable[[], dict] | None" = None) -> "Scoring":
        batchnorms = {n.name: n for n in model.graph.node if n.op_type == "BatchNormalization"}
        return cls(weights, batchnorm_after(model), batchnorms, seed, landmarks, bn_mode, statistics)

    @classmethod
    def for_prepared(cls, prepared, seed: int = 0, landmarks: int | None = None, bn_mode: str = "gamma",
                     calib=None, synthetic: bool = True) -> "Scoring":
        """Scoring of a `pipeline.Prepared` model, with its channel statistics computed when first needed:
        data-free from BatchNorm where the graph has it, else measured on `calib` (feeds or an .npz path) or,
        without, on synthetic 1/f-noise inputs."""
        def statistics() -> dict:
            from onnx_prune.analysis.expected import channel_statistics

            ids = [g.id for g in prepared.analysis.prunable_groups]
            if calib is None:  # BatchNorms folded by a method's pass still give data-free statistics (HR)
                from onnx_prune.passes.compensate import statistics_before_folding
                return statistics_before_folding(prepared, ids, lambda p, i: channel_statistics(
                    p, i, None, seed=seed, synthetic=synthetic))
            return channel_statistics(prepared, ids, calib, seed=seed, synthetic=synthetic)

        return cls.of(prepared.model, prepared.weights(), seed, landmarks, bn_mode, statistics)

    def group_statistics(self, group_id: int):
        """The `GroupStatistics` of a group (None where none were computed for it)."""
        if self.statistics is None:
            raise ValueError(f"criterion '{VARIANCE_CRITERION}' needs channel statistics: build the Scoring with "
                             "Scoring.for_prepared(prepared) or pass statistics=")
        if callable(self.statistics):
            self.statistics = self.statistics()
        return self.statistics.get(group_id)


AGGREGATE_ROLES = {"first": ("producer",), "mean": ("producer",), "max": ("producer",),
                   "domino-o": ("producer", "carrier"), "domino-io": ("producer", "carrier", "consumer")}


def channel_scores(group: Group, scoring: Scoring, criterion: str = "l2", aggregate: str = "domino-o",
                   normalize: bool = False) -> np.ndarray:
    """One score per channel of `group` (higher = keep)."""
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{aggregate}' (choose from {', '.join(AGGREGATIONS)})")
    weights = scoring.weights
    rng = np.random.default_rng(scoring.seed + group.id)
    if criterion == BN_CRITERION:
        combined = _bn_scores(group, scoring)
        if combined is None:
            return channel_scores(group, scoring, "l2", aggregate, normalize)
    elif criterion == VARIANCE_CRITERION:
        combined = variance_scores(group, scoring)
        if combined is None:
            return channel_scores(group, scoring, "l2", aggregate, normalize)
    else:
        score_fn = CRITERIA[criterion]
        sets = filter_sets(group, weights, AGGREGATE_ROLES[aggregate], scoring.bn_after, scoring.bn_mode,
                           scoring.batchnorms)
        if aggregate == "first":
            sets = sets[:1]
        per_set = []
        for f in sets:
            score = score_fn(f, rng=rng, landmarks=scoring.landmarks, notes=scoring.notes)
            per_set.append(_accumulate(group.size, f, score if f.factor is None else score * f.factor))
        if not per_set:
            return np.zeros(group.size)
        stacked = np.vstack(per_set)
        combined = {"max": stacked.max(axis=0), "mean": stacked.mean(axis=0)}.get(aggregate, stacked.sum(axis=0))
    if normalize:
        combined = combined / np.maximum(removed_weights(group, weights), 1)
    return combined


def removed_weights(group: Group, weights: Weights) -> np.ndarray:
    """How many weights removing each channel deletes, over every member of the group."""
    count = np.zeros(group.size)
    for member in group.members:
        shape = weight_shape(weights, member.param)
        np.add.at(count, member.channels, int(np.prod(shape)) // shape[member.axis])
    return count


def _bn_scores(group: Group, scoring: Scoring) -> np.ndarray | None:
    """Sum of |gamma| over the group's BatchNorms; None where the group has none."""
    score = np.zeros(group.size)
    found = False
    for member in group.by_role("carrier"):
        bn = scoring.batchnorms.get(member.node)
        if bn is not None and member.param == bn.input[1]:
            np.add.at(score, member.channels, np.abs(scoring.weights(member.param)[member.positions]))
            found = True
    return score if found else None


TRUSTED_VARIANCE = ("bn", "measured", "constant")  # statistics sources whose variances rank channels


def variance_scores(group: Group, scoring: Scoring) -> np.ndarray | None:
    """bnvar: the damage of removing channel c once its consumers read its mean instead (compensation),

        sum over consumers k of  Var[x_c as k reads it] * ||W_k[:, c]||^2

    i.e. the expected squared error added to the consumers' pre-activation outputs (exact for 1x1 and Gemm
    consumers; for k x k kernels it treats neighbouring pixels as uncorrelated).  The variance comes from
    `Scoring.group_statistics`: the BatchNorm's N(beta, gamma^2) pushed through the activation (data-free), or
    measured.  A nearly dead channel (beta << 0, small gamma) has almost no variance after a ReLU, whatever its
    BN-folded filter norm, and goes first; a deterministic channel scores 0 (compensation makes its removal
    exact).  The aggregation is implicit (every consumer of the group); None where no consumer reads the group
    visibly (the caller falls back to l2)."""
    stats = scoring.group_statistics(group.id)
    if stats is None or not stats.reads:
        scoring.notes.setdefault(VARIANCE_CRITERION, {})[group.id] = "no consumer statistics: l2"
        return None
    scoring.notes.setdefault(VARIANCE_CRITERION, {})[group.id] = stats.source
    score = np.zeros(group.size)
    for consumer in filter_sets(group, scoring.weights, ("consumer",)):
        read = stats.reads.get(consumer.node)
        var, source = (read.var, read.source) if read is not None else (stats.var, stats.source)
        deterministic = read.deterministic if read is not None else stats.deterministic
        if source not in TRUSTED_VARIANCE:
            # estimated without BatchNorm or data (a BN-fused export): such variances do not rank channels
            # (correlation -0.54..+0.50 with the BatchNorm ones on MobileNetV2, benchmarks/results/
            # datafree_experiments.md), so every varying channel counts 1 and the consumer weights decide
            var = np.where(deterministic, 0.0, 1.0)
        var = np.where(np.isfinite(var), var, 0.0)  # NaN: this consumer does not read the channel
        energy = row_energy(consumer.rows[:, :-1])  # ||W_k[:, position]||^2 (no bias column)
        np.add.at(score, consumer.channels, energy * var[consumer.channels])
    return score
