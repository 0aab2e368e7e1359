"""Second-order post-training channel selection and reconstruction (METHODS.md §6; OBS/OBC, ThiNet/CP).

A consumer layer with input features X (calibration rows, a column of ones for its bias) and weights theta
(features x outputs) is fitted to its ORIGINAL output Y by ridge regression toward its current weights,

    f(theta) = ||X theta - Y||^2 + lam ||D (theta - theta0)||^2,   D = 1 on weights, 0 on the bias,

a quadratic with Hessian H = X^T X + lam D.  Removing the feature set S (a channel: its k*k taps, or the block
of columns a Flatten gives it) from the minimiser theta~ costs exactly

    theta~_S^T ((H^-1)_SS)^-1 theta~_S          (summed over outputs: a trace)

and the best remaining weights are theta~ - H^-1_{:,S} ((H^-1)_SS)^-1 theta~_S (group OBS).  Channels are
removed greedily, updating theta and H^-1 after each removal; a channel group read by several consumers
(Domino coupling) pays the sum of its consumers' costs, each divided by its output's energy so that layers of
different scale compare.  The greedy step costs make a damage curve per group, for allocation.

The ridge amount is chosen by cross-validation over folds split by source (calibration photo) computed from
fold moments alone (`runtime.calibration.FoldMoments`); lam = infinity is in the grid: it keeps the original
weights and refits the bias only, i.e. compensation of the removed channels by their measured means, so a
reconstruction that does not beat compensation on held-out sources is refused by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from onnx import numpy_helper

from onnx_prune.passes.sensitivity import DamageCurve, damage_counts, output_damage
from onnx_prune.runtime.calibration import FOLDS, FoldMoments, _in_axis

# ridge amounts tried, relative to the mean diagonal of X^T X over the weights; inf = compensation only
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, np.inf)
SELECT_RIDGE = 1e-2  # damping of H for selection, relative to its mean diagonal


def penalty(features: int, bias: bool) -> np.ndarray:
    d = np.ones(features)
    if bias:
        d[-1] = 0.0
    return d


def ridge_unit(gram: np.ndarray, d: np.ndarray) -> float:
    """Mean diagonal of the Gram matrix over penalised features (what relative ridge amounts multiply)."""
    diagonal = np.diag(gram)[d > 0]
    unit = float(diagonal.mean()) if diagonal.size else 0.0
    return unit if unit > 0 else 1.0


def ridge_solve(gram: np.ndarray, cross: np.ndarray, theta0: np.ndarray, lam: float, d: np.ndarray) -> np.ndarray:
    """argmin ||X theta - Y||^2 + lam ||D(theta - theta0)||^2; lam = inf pins the weights and fits the rest."""
    if np.isinf(lam):
        theta = theta0.copy()
        free = d == 0
        if free.any():
            rhs = cross[free] - gram[np.ix_(free, ~free)] @ theta0[~free]
            theta[free] = _solve(gram[np.ix_(free, free)], rhs)
        return theta
    return _solve(gram + np.diag(lam * d), cross + (lam * d)[:, None] * theta0)


def _solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(lhs, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(lhs, rhs)[0]


def squared_error(gram: np.ndarray, cross: np.ndarray, yy: np.ndarray, theta: np.ndarray) -> float:
    """||X theta - Y||^2 from moments."""
    return float(yy.sum() - 2.0 * np.sum(theta * cross) + np.sum(theta * (gram @ theta)))


@dataclass
class RidgeChoice:
    """The ridge chosen by cross-validation over source folds, and what each candidate scored there."""
    relative: float                        # lam / ridge unit; inf = compensation only (weights pinned)
    lam: float
    theta: np.ndarray
    cv_error: float                        # held-out squared error / held-out target energy, at the choice
    cv_compensation: float                 # the same for lam = inf
    cv_errors: dict = field(default_factory=dict)   # relative lam (as str) -> held-out relative error

    @property
    def reconstructs(self) -> bool:
        return bool(np.isfinite(self.relative))


def restrict(moments: FoldMoments, keep: np.ndarray) -> FoldMoments:
    """The moments of the feature columns `keep` only."""
    index = np.asarray(keep)
    position = {int(c): i for i, c in enumerate(index)}
    probed = [i for i, c in enumerate(moments.probes.tolist()) if c in position]
    return FoldMoments(moments.gram[:, index][:, :, index], None if moments.cross is None else moments.cross[:, index],
                       moments.yy, moments.rows, moments.source_sums[:, probed], moments.source_rows,
                       moments.bias and bool(index[-1] == moments.gram.shape[1] - 1),
                       np.array([position[int(moments.probes[i])] for i in probed], dtype=np.int64))


def choose_ridge(moments: FoldMoments, theta0: np.ndarray, grid=RIDGE_GRID, finite_only: bool = False
                 ) -> RidgeChoice:
    """Cross-validate the ridge amount over the folds that hold rows (each held out in turn), then refit on all.

    With fewer than two non-empty folds there is nothing to hold out: the smallest finite amount of the
    grid that is >= 1e-2 is used (a conservative default)."""
    d = penalty(len(theta0), moments.bias)
    gram, cross, yy, _ = moments.total()
    unit = ridge_unit(gram, d)
    candidates = [g for g in grid if not (finite_only and np.isinf(g))]
    used = [f for f in range(moments.folds) if moments.rows[f] > 0]
    errors = {}
    if len(used) >= 2:
        energy = float(sum(moments.yy[f].sum() for f in used)) or 1.0
        for relative in candidates:
            total = 0.0
            for f in used:
                g_fit, c_fit = gram - moments.gram[f], cross - moments.cross[f]
                theta = ridge_solve(g_fit, c_fit, theta0, relative * ridge_unit(g_fit, d), d)
                total += squared_error(moments.gram[f], moments.cross[f], moments.yy[f], theta)
            errors[relative] = total / energy
        best = min(candidates, key=lambda r: (errors[r], -r))  # ties: the stronger shrinkage
    else:
        best = min((g for g in candidates if np.isfinite(g) and g >= 1e-2), default=candidates[-1])
    theta = ridge_solve(gram, cross, theta0, best * unit, d)
    return RidgeChoice(best, best * unit, theta, errors.get(best, np.nan), errors.get(np.inf, np.nan),
                       {str(k): v for k, v in errors.items()})


# --- group OBS

@dataclass
class ObsLayer:
    """One consumer during selection: current weights (F x O) and inverse Hessian (F x F), the feature
    columns of each channel of the group being pruned, and the scale its costs are divided by."""
    theta: np.ndarray
    hinv: np.ndarray
    blocks: dict[int, np.ndarray]
    scale: float = 1.0

    @classmethod
    def fitted(cls, gram: np.ndarray, cross: np.ndarray, theta0: np.ndarray, lam: float, bias: bool,
               blocks: dict[int, np.ndarray], scale: float = 1.0) -> "ObsLayer":
        """The ridge minimiser and the inverse of its Hessian X^T X + lam D."""
        d = penalty(len(theta0), bias)
        hessian = gram + np.diag(lam * d)
        theta = ridge_solve(gram, cross, theta0, lam, d)
        return cls(theta, _inverse(hessian), {c: np.asarray(b) for c, b in blocks.items()}, scale)

    def cost(self, channel: int) -> float:
        block = self.blocks.get(channel)
        if block is None or len(block) == 0:
            return 0.0
        sub = self.hinv[np.ix_(block, block)]
        w = self.theta[block]
        return float(np.sum(w * _solve_sym(sub, w))) / self.scale

    def costs(self, channels: list[int]) -> np.ndarray:
        """cost(c) for many channels at once (batched over channels with blocks of one size)."""
        out = np.zeros(len(channels))
        by_size: dict[int, list[int]] = {}
        for i, c in enumerate(channels):
            block = self.blocks.get(c)
            if block is not None and len(block):
                by_size.setdefault(len(block), []).append(i)
        for size, rows in by_size.items():
            index = np.stack([self.blocks[channels[i]] for i in rows])               # (n, b)
            sub = self.hinv[index[:, :, None], index[:, None, :]]                     # (n, b, b)
            w = self.theta[index]                                                     # (n, b, O)
            if size == 1:
                diagonal = sub[:, 0, 0]
                value = np.where(diagonal > 0, np.sum(w[:, 0] ** 2, axis=1) / np.where(diagonal > 0, diagonal, 1), 0)
            else:
                try:
                    value = np.sum(w * np.linalg.solve(sub, w), axis=(1, 2))
                except np.linalg.LinAlgError:
                    value = np.array([self.cost(channels[i]) * self.scale for i in rows])
            out[rows] = value / self.scale
        return out

    def remove(self, channel: int) -> None:
        """The OBS update: the channel's columns go to zero, the others compensate; H^-1 loses the block."""
        block = self.blocks.get(channel)
        if block is None or len(block) == 0:
            return
        sub = self.hinv[np.ix_(block, block)]
        columns = self.hinv[:, block]
        self.theta -= columns @ _solve_sym(sub, self.theta[block])
        self.hinv -= columns @ _solve_sym(sub, columns.T)
        self.theta[block] = 0.0
        self.hinv[block, :] = 0.0
        self.hinv[:, block] = 0.0


def _inverse(matrix: np.ndarray) -> np.ndarray:
    try:
        factor = scipy.linalg.cho_factor(matrix)
        return scipy.linalg.cho_solve(factor, np.eye(len(matrix)))
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.pinv(matrix)


def _solve_sym(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """matrix^-1 rhs for a small symmetric block of H^-1 (pseudo-inverse where it is singular)."""
    try:
        return scipy.linalg.solve(matrix, rhs, assume_a="sym")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        return np.linalg.pinv(matrix) @ rhs


@dataclass
class GreedyResult:
    removed: list[int]        # channels in the order they were removed
    step_costs: list[float]   # the summed (scaled) cost each removal added, in that order

    @property
    def damage(self) -> np.ndarray:
        """Cumulative damage after removing 0, 1, 2, ... channels."""
        return np.concatenate([[0.0], np.cumsum(self.step_costs)])


def greedy_obs(layers: list[ObsLayer], candidates, n_remove: int) -> GreedyResult:
    """Remove `n_remove` of `candidates`, each time the channel whose removal costs least summed over `layers`
    (ties: lower index), updating every layer's weights and inverse Hessian after each removal."""
    left = sorted(int(c) for c in candidates)
    removed, costs = [], []
    for _ in range(min(n_remove, len(left))):
        totals = np.sum([layer.costs(left) for layer in layers], axis=0) if layers else np.zeros(len(left))
        pick = int(np.argmin(totals))
        channel = left.pop(pick)
        for layer in layers:
            layer.remove(channel)
        removed.append(channel)
        costs.append(float(totals[pick]))
    return GreedyResult(removed, costs)


# --- layer by layer over a network

@dataclass
class ConsumerView:
    """A consumer of the group being pruned, in the current (partly pruned) model: its node there, which
    positions of its weight's input axis survive so far, and the feature columns of each channel of the group."""
    node: object
    weight: str
    in_axis: int
    in_keep: np.ndarray              # bool per ORIGINAL input position
    blocks: dict[int, np.ndarray]    # channel of the group -> feature columns (current coordinates)
    has_bias: bool


def _group_order(model, analysis, group_ids) -> list[int]:
    """Groups by the graph position of their first producer (topological order for a sorted graph)."""
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    return sorted(group_ids, key=lambda g: (min([position.get(n, 0) for n in analysis.groups[g].nodes("producer")],
                                                default=0), g))


def _has_bias(node) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def consumer_views(analysis, model, gid: int, kept: np.ndarray) -> tuple[list[ConsumerView], dict[str, str]]:
    """The refittable consumers of group `gid` in `model` (the current reduced model), and the others with why."""
    from onnx_prune.passes.repair import _unfit

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes = {n.name: n for n in model.graph.node}
    views, skipped = [], {}
    for name in analysis.groups[gid].nodes("consumer"):
        node = nodes.get(name)
        if node is None or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 \
                or node.input[1] not in weights or node.input[0] in weights:
            skipped[name] = "not a Conv/Gemm/MatMul with a constant weight"
            continue
        why = _unfit(node, weights, readers)
        if why:
            skipped[name] = why
            continue
        w = weights[node.input[1]]
        axis = _in_axis(node, w)
        ids = analysis.param_ids.get((node.input[1], axis))
        if ids is None:
            skipped[name] = "its input axis carries no channel ids"
            continue
        in_keep = kept[ids]
        taps = int(np.prod(w.shape[2:])) if node.op_type == "Conv" else 1
        rank = np.cumsum(in_keep) - 1  # current position of each surviving original position
        blocks: dict[int, list] = {}
        mine = np.nonzero((analysis.id_group[ids] == gid) & in_keep)[0]
        for p in mine:
            start = int(rank[p]) * taps
            blocks.setdefault(int(analysis.id_channel[ids[p]]), []).extend(range(start, start + taps))
        views.append(ConsumerView(node, node.input[1], axis, in_keep,
                                  {c: np.asarray(b) for c, b in blocks.items()}, _has_bias(node)))
    return views, skipped


def _theta_original_outputs(view: ConsumerView, working: dict[str, np.ndarray]) -> np.ndarray:
    """The consumer's weights in the working model (original shapes), restricted to its surviving inputs,
    with every ORIGINAL output (targets come from the original model), bias row last where it has one."""
    from onnx_prune.runtime.calibration import Layer

    node = view.node
    sliced = {node.input[1]: np.take(working[node.input[1]], np.nonzero(view.in_keep)[0], axis=view.in_axis)}
    if view.has_bias:
        sliced[node.input[2]] = working[node.input[2]]
    theta = Layer(node).theta(sliced)
    if Layer(node).fits_bias and not view.has_bias:
        theta = theta[:-1]
    return theta


def _write_original_coordinates(view: ConsumerView, theta: np.ndarray, new_in_keep: np.ndarray,
                                working: dict[str, np.ndarray]) -> None:
    """Store a consumer's refit (rows: its surviving input features, then its bias where it has one) into the
    working weights in ORIGINAL shapes: surviving input positions get the refit, removed ones zero (the rewrite
    drops them)."""
    from onnx_prune.runtime.calibration import Layer

    node, layer = view.node, Layer(view.node)
    matrix = theta[:-1] if view.has_bias else theta
    original = working[node.input[1]]
    positions = np.nonzero(new_in_keep)[0]
    moved = np.moveaxis(np.zeros(original.shape), view.in_axis, 0)
    if node.op_type == "Conv":  # rows (position, kh, kw) x outputs -> (positions, outputs, kh, kw)
        block = matrix.T.reshape((original.shape[0], len(positions)) + original.shape[2:])
        moved[positions] = np.moveaxis(block, 1, 0)
    else:  # Gemm (either transB: the input axis moved first is B' = B^T) and MatMul: inputs x outputs
        moved[positions] = matrix / (layer.attr("alpha", 1.0) if node.op_type == "Gemm" else 1.0)
    working[node.input[1]] = np.moveaxis(moved, 0, view.in_axis).astype(original.dtype)
    if view.has_bias:
        old = working[node.input[2]]
        beta = layer.attr("beta", 1.0) if node.op_type == "Gemm" else 1.0
        working[node.input[2]] = (theta[-1] / beta).reshape(old.shape).astype(old.dtype)


@dataclass
class GroupSelection:
    """What selection did for one group (for the report)."""
    group: int
    name: str
    size: int
    kept: int
    removed: list[int]
    damage: list[float]                  # cumulative summed relative error after each removal
    consumers: list[str]
    skipped: dict[str, str]
    ridge: dict[str, float]              # consumer -> relative ridge of its interim reconstruction (inf: bias)
    effective_samples: dict[str, float]  # consumer -> effective sample count
    fallback: str = ""                   # why selection fell back to a data-free criterion

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v)) for k, v in self.__dict__.items()}


def _selection_layer(view, moments: FoldMoments, working: dict[str, np.ndarray], select_ridge: float):
    """(ObsLayer, the moments it used, the original weights) for one consumer: its original weights fitted on `moments` (without the
    bias column where the layer has no bias).  Selection uses a small fixed damping (as SparseGPT's 1% of the
    mean diagonal): the ridge cross-validation would pick for the unpruned fit says nothing about which channels
    can go."""
    from onnx_prune.runtime.calibration import Layer

    if Layer(view.node).fits_bias and not view.has_bias:
        moments = restrict(moments, np.arange(moments.gram.shape[1] - 1))
    theta0 = _theta_original_outputs(view, working)
    gram, cross, _, _ = moments.total()
    lam = select_ridge * ridge_unit(gram, penalty(len(theta0), moments.bias))
    return ObsLayer.fitted(gram, cross, theta0, lam, moments.bias, view.blocks, _output_energy(moments)), moments, theta0


def _output_energy(moments: FoldMoments) -> float:
    """Centred energy of the target over all rows (what a following BatchNorm would see), summed over outputs."""
    gram, cross, yy, n = moments.total()
    if moments.bias and n:
        return float(max((yy - cross[-1] ** 2 / n).sum(), 1e-30))
    return float(max(yy.sum(), 1e-30))


def obs_plan(prepared, counts: dict[int, int], feeds: list[dict], sources=None, *, folds: int = FOLDS,
             positions: int = 64, batch: int = 16, seed: int = 0, ridge: float = 1e-3,
             select_ridge: float = SELECT_RIDGE, interim: bool = True, quiet: bool = False) -> tuple["Plan", dict]:
    """Choose the kept channels of every group in `counts` (group id -> channels to keep) by group OBS on
    calibration `feeds`, group by group in topological order.  Each group's consumers are measured in the
    network pruned so far (with `interim`: their weights reconstructed toward the original outputs after each
    group, so that later groups see what the final network will compute) against the ORIGINAL model's outputs.

    Returns the Plan (plain pruning: `keep` only; reconstruct the weights with `passes.repair.repair`) and
    details: per group the removal order, the damage curve, the ridge and effective samples per consumer.
    `ridge`: the least ridge the interim reconstructions may choose; `select_ridge`: H's damping for selection."""
    from onnx_prune.analysis.criteria import Scoring, channel_scores
    from onnx_prune.passes.allocate import kept_ids, select_top
    from onnx_prune.passes.plan import GroupPlan, Plan
    from onnx_prune.passes.repair import dynamic_batch
    from onnx_prune.passes.rewrite import ApplyPlanPass
    from onnx_prune.runtime.calibration import (Layer, Progress, collect_moments, feed_batches, source_folds,
                                                source_index)

    analysis, original = prepared.analysis, prepared.model
    batches = feed_batches(feeds, batch, dynamic_batch(original))
    samples = int(batches[-1][1][-1]) + 1 if batches else 0
    if samples < 2:
        raise ValueError("second-order selection needs at least 2 calibration samples")
    folds = min(folds, samples)
    fold_of = source_folds(sources, samples, folds)
    source_of, n_sources = source_index(sources, samples)
    grid = fit_grid(ridge)
    progress = Progress(quiet=quiet, label="obs")
    working = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    plan = Plan()
    selections = []
    shrinking = [g for g, n in counts.items() if n < analysis.groups[g].size]
    scoring = None
    for step, gid in enumerate(_group_order(original, analysis, shrinking)):
        group = analysis.groups[gid]
        n_keep = max(int(counts[gid]), int(group.frozen.sum()), 1)
        model = _with_weights(original, working)
        current = ApplyPlanPass(analysis, plan)(model).model if plan.groups else model
        kept = kept_ids(analysis, plan)
        views, skipped = consumer_views(analysis, current, gid, kept)
        candidates = np.nonzero(~group.frozen)[0]
        layers, chosen, effective, moments_of = [], {}, {}, []
        if views:
            progress.label = f"obs group {step + 1}/{len(shrinking)} ({group.name})"
            found = collect_moments(current, [Layer(v.node) for v in views], batches, fold_of, source_of, n_sources,
                                    target=original, folds=folds, positions=positions, seed=seed,
                                    progress=progress)
            for view, moments in zip(views, found):
                layer, moments, theta0 = _selection_layer(view, moments, working, select_ridge)
                layers.append(layer)
                effective[view.node.name] = moments.effective_samples()
                moments_of.append((view, moments, theta0))
        fallback = ""
        if layers:
            result = greedy_obs(layers, candidates, group.size - n_keep)
            keep = np.setdiff1d(np.arange(group.size), result.removed)
            removed, damage = result.removed, result.damage.tolist()
        else:  # no consumer can be measured (e.g. only grouped convs read it): the data-free l2 criterion
            scoring = scoring or Scoring.of(original, prepared.weights(), seed)
            keep = select_top(channel_scores(group, scoring, "l2", "domino-o"), group.frozen, n_keep)
            removed, damage = sorted(set(range(group.size)) - set(keep.tolist())), []
            fallback = "no refittable consumer: l2"
        plan.groups[gid] = GroupPlan(keep)
        if interim and moments_of:
            new_kept = kept_ids(analysis, plan)
            for view, moments, theta0 in moments_of:
                ids = analysis.param_ids[(view.weight, view.in_axis)]
                new_in_keep = new_kept[ids]
                columns = _surviving_columns(view, new_in_keep, moments.gram.shape[1], moments.bias)
                refit = choose_ridge(restrict(moments, columns), theta0[columns], grid)
                chosen[view.node.name] = refit.relative
                _write_original_coordinates(view, refit.theta, new_in_keep, working)
        selections.append(GroupSelection(gid, group.name, group.size, len(keep), [int(c) for c in removed],
                                         damage, [v.node.name for v in views], skipped, chosen, effective, fallback))
    return plan, {"groups": [s.to_dict() for s in selections], "samples": samples, "folds": folds,
                  "split": "by source" if sources is not None else "contiguous blocks of samples",
                  "progress": progress.lines}


def _surviving_columns(view: ConsumerView, new_in_keep: np.ndarray, features: int, bias: bool) -> np.ndarray:
    """Feature columns (current coordinates) that survive the new plan, the bias column last where present."""
    taps = (features - int(bias)) // max(int(view.in_keep.sum()), 1)
    survivors = new_in_keep[view.in_keep]  # per current position
    columns = (np.nonzero(survivors)[0][:, None] * taps + np.arange(taps)).reshape(-1)
    if bias:
        columns = np.append(columns, features - 1)
    return columns


def _with_weights(model, working: dict[str, np.ndarray]):
    """A copy of `model` whose initializers hold `working` (same names and shapes)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in working:
            tensor.CopyFrom(numpy_helper.from_array(working[tensor.name], tensor.name))
    return out


def fit_grid(ridge: float) -> tuple[float, ...]:
    """`ridge` itself and every larger amount of RIDGE_GRID (infinity included)."""
    return tuple(sorted({float(ridge)} | {g for g in RIDGE_GRID if g >= ridge}))


# --- sensitivity: measured damage per group (allocation by `passes.sensitivity`)

def damage_curves(prepared, feeds: list[dict], group_ids, ratios=(0.25, 0.5, 0.75), samples: int = 64, *,
                  sources=None, positions: int = 64, batch: int = 16, seed: int = 0,
                  select_ridge: float = SELECT_RIDGE, quiet: bool = False) -> dict[int, DamageCurve]:
    """Per group, the damage to the model's outputs (`output_damage`, on the first `samples` feeds' samples)
    when that group alone loses `ratios` of its free channels, chosen and compensated by group OBS on the
    consumers' calibration Grams (one pass over `feeds` for every consumer of the model).  Removing a channel
    is zeroing its consumer columns: the function of the pruned model, without rewriting it."""
    import sys

    from onnx_prune.passes.repair import dynamic_batch
    from onnx_prune.runtime.calibration import (Layer, Progress, collect_moments, feed_batches, source_index)
    from onnx_prune.runtime.sessions import make_session

    analysis, original = prepared.analysis, prepared.model
    # the damage is measured on samples the Grams never saw (the last source fold, at most `samples` of them):
    # measured in-sample, an OBS reconstruction from few rows looks free (a 1281-feature classifier fitted on
    # 256 rows) and the allocation then strips exactly the layers it cannot reconstruct
    fit_feeds, held_feeds = split_by_source(feeds, sources, samples)
    batches = feed_batches(fit_feeds, batch, dynamic_batch(original))
    count = int(batches[-1][1][-1]) + 1
    source_of, n_sources = source_index(None, count)
    kept = np.ones(len(analysis.id_group), dtype=bool)
    views = {gid: consumer_views(analysis, original, gid, kept)[0] for gid in group_ids}
    nodes = sorted({v.node.name for vs in views.values() for v in vs})
    by_name = {n.name: n for n in original.graph.node}
    found = collect_moments(original, [Layer(by_name[n]) for n in nodes], batches, np.zeros(count, dtype=np.int64),
                            source_of, n_sources, target=original, folds=1, positions=positions, seed=seed,
                            progress=Progress(quiet=quiet, label="damage: calibration"))
    moments_of = dict(zip(nodes, found))
    check = [feed for feed, _ in feed_batches(held_feeds, batch, dynamic_batch(original))]
    session = make_session(original)
    reference = [session.run(None, feed) for feed in check]
    working = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    curves = {}
    for step, gid in enumerate(sorted(group_ids)):
        group = analysis.groups[gid]
        free = np.nonzero(~group.frozen)[0]
        targets = sorted({int(round(r * len(free))) for r in ratios} - {0})
        targets = [t for t in targets if t < group.size]
        if not views[gid] or not targets:
            continue
        layers, thetas = [], []
        for view in views[gid]:
            layers.append(_selection_layer(view, moments_of[view.node.name], working, select_ridge)[0])
        damage, removed_so_far = [0.0], []
        for target in targets:
            result = greedy_obs(layers, [c for c in free if c not in removed_so_far], target - len(removed_so_far))
            removed_so_far += result.removed
            trial = dict(working)
            out_keep = np.ones(group.size, dtype=bool)
            out_keep[removed_so_far] = False
            for view, layer in zip(views[gid], layers):
                ids = analysis.param_ids[(view.weight, view.in_axis)]
                in_group = analysis.id_group[ids] == gid
                in_keep = np.ones(len(ids), dtype=bool)
                in_keep[in_group] = out_keep[analysis.id_channel[ids[in_group]]]
                columns = _surviving_columns(view, in_keep, layer.theta.shape[0], view.has_bias)
                _write_original_coordinates(view, layer.theta[columns], in_keep, trial)
            model = _with_weights(original, trial)
            pruned = make_session(model)
            damage.append(float(np.mean([output_damage(ref, pruned.run(None, feed))
                                         for ref, feed in zip(reference, check)])))
        curves[gid] = DamageCurve(gid, [0] + targets, damage)
        if not quiet:
            print(f"damage: group {step + 1}/{len(group_ids)} {group.name}: "
                  + ", ".join(f"{k}/{group.size} -> {d:.4g}" for k, d in zip(targets, damage[1:])),
                  file=sys.stderr, flush=True)
    return curves


def split_by_source(feeds: list[dict], sources=None, held: int = 64, folds: int = FOLDS
                    ) -> tuple[list[dict], list[dict]]:
    """(fit feeds, held-out feeds): the held-out side is the last source fold (`runtime.calibration.source_folds`:
    whole sources, or a contiguous block without them), cut to about `held` samples at a source's end (the rest
    of that fold is fitted: no source on both sides); never empty on either side."""
    from onnx_prune.runtime.calibration import sample_count, source_folds

    counts = [sample_count(f) for f in feeds]
    if len(feeds) < 2:
        raise ValueError("measuring damage needs at least 2 calibration feeds (to fit and to check)")
    firsts = np.cumsum([0] + counts[:-1])
    fold_of = source_folds(sources, int(sum(counts)), min(folds, len(feeds)))[firsts]
    last = int(fold_of.max())
    held_ids = [i for i in range(len(feeds)) if fold_of[i] == last]
    # cut at whole sources (a feed's source: its first sample's), so no source has feeds on both sides
    feed_source = range(len(feeds)) if sources is None else np.asarray(sources)[firsts].tolist()
    by_source: dict = {}
    for i in held_ids:
        by_source.setdefault(feed_source[i], []).append(i)
    taken, chosen = 0, []
    for members in by_source.values():
        if taken >= held:
            break
        chosen += members
        taken += sum(counts[i] for i in members)
    chosen.sort()
    if len(chosen) == len(feeds):
        chosen = chosen[-1:]
    chosen_set = set(chosen)
    return [f for i, f in enumerate(feeds) if i not in chosen_set], [feeds[i] for i in chosen]


def obs_select(prepared, target, feeds: list[dict], sources=None, *, group_ids=None, allocation: str = "damage",
               counts: dict[int, int] | None = None, cost_model=None, round_to=1, max_ratio: float = 1.0,
               make_allocator=None, curves: dict | None = None, ratios=(0.25, 0.5, 0.75), damage_samples: int = 64, positions: int = 64, batch: int = 16,
               seed: int = 0, ridge: float = 1e-3, select_ridge: float = SELECT_RIDGE, quiet: bool = False):
    """Allocation and selection, the Plan part of second-order calibrated pruning: (Plan, details).

    - `target`: a `passes.constraints.Target`; `group_ids`: the groups that may shrink (default: every
      prunable one; the caller removes excluded / protected ones); `counts` overrides the allocation.
    - `allocation`: "damage" (measured per-group damage curves, `damage_curves`, or `curves` when given,
      minimised by `damage_counts` under the target, `round_to` and `max_ratio`) or "uniform" (the same share
      of every group).
    - selection: `obs_plan`.  The Plan is plain pruning; reconstruct the weights after the rewrite with
      `passes.repair.repair(..., sources=sources)` (what `obs_prune` does)."""
    from onnx_prune.passes.allocate import Allocator, CostModel
    from onnx_prune.runtime.cost import count_cost

    analysis = prepared.analysis
    group_ids = sorted(group_ids if group_ids is not None else [g.id for g in analysis.prunable_groups])
    details: dict = {"allocation": allocation if counts is None else "given"}
    if counts is None:
        if cost_model is None:
            cost = count_cost(prepared.model)
            cost_model = CostModel.of(prepared.model, analysis, {n: c.macs for n, c in cost.per_node.items()})
        if allocation == "damage":
            if curves is None:  # (curves do not depend on the target: a caller may measure them once)
                curves = damage_curves(prepared, feeds, group_ids, ratios, damage_samples, sources=sources,
                                       positions=positions, batch=batch, seed=seed, select_ridge=select_ridge,
                                       quiet=quiet)
            counts = damage_counts(prepared, curves, group_ids, target, cost_model, round_to, max_ratio,
                                   make_allocator)
            details["damage_curves"] = {str(g): c.to_dict() for g, c in curves.items()}
        elif allocation == "uniform":
            scores = {g: np.zeros(analysis.groups[g].size) for g in group_ids}
            allocator = make_allocator(scores) if make_allocator else \
                Allocator(analysis, scores, cost_model, round_to, max_ratio)
            counts = allocator.counts_for(target, "uniform")
        else:
            raise ValueError(f"unknown allocation '{allocation}' (damage or uniform)")
    details["allocation_per_group"] = {analysis.groups[g].name: {"size": analysis.groups[g].size, "kept": int(n)}
                                       for g, n in sorted(counts.items())}
    plan, details["selection"] = obs_plan(prepared, counts, feeds, sources, positions=positions, batch=batch,
                                          seed=seed, ridge=ridge, select_ridge=select_ridge, quiet=quiet)
    return plan, details


def obs_prune(prepared, target, feeds: list[dict], sources=None, *, reconstruct: bool = True, **options):
    """Second-order calibrated pruning end to end: `obs_select` (allocation, selection; `options` as there),
    the rewrite, and reconstruction by `passes.repair.repair` (ridge toward the original weights chosen by
    cross-validation over source folds, bias-only compensation as the fallback).  (model, details, plan)."""
    from onnx_prune.passes.repair import repair
    from onnx_prune.passes.rewrite import ApplyPlanPass

    plan, details = obs_select(prepared, target, feeds, sources, **options)
    model = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    if reconstruct:
        samples = sum(len(next(iter(f.values()))) for f in feeds)
        model, report = repair(prepared.model, model, feeds, prepared.analysis, plan,
                               ridge=options.get("ridge", 1e-3), batch=options.get("batch", 16),
                               seed=options.get("seed", 0), sources=sources, quiet=options.get("quiet", False),
                               rows=options.get("positions", 64) * samples)
        details["reconstruction"] = report
    return model, details, plan


def progressive_obs(prepared, schedule, feeds: list[dict], sources=None, **options):
    """Reach the last fraction of `schedule` (fractions of the ORIGINAL MACs, decreasing, e.g. (0.9, 0.8, 0.67))
    in several prune-reconstruct steps: each step prunes the previous step's model to the next fraction with
    `obs_prune`, taking its targets from that model.  Returns (model, details per step).  `options`: as
    `obs_prune` (no `group_ids`: every step analyses its own model)."""
    from onnx_prune.passes.constraints import Target
    from onnx_prune.pipeline import prepare
    from onnx_prune.runtime.cost import count_cost

    base = count_cost(prepared.model).macs
    current, steps = prepared, []
    for fraction in schedule:
        now = count_cost(current.model).macs / base
        if fraction >= now:
            continue
        model, details, _ = obs_prune(current, Target(macs=fraction / now), feeds, sources, **options)
        steps.append({"target": fraction, "reached": count_cost(model).macs / base, **details})
        current = prepare(model)
    return current.model, steps
