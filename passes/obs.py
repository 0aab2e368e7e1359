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

from onnx_prune.runtime.calibration import FoldMoments

# ridge amounts tried, relative to the mean diagonal of X^T X over the weights; inf = compensation only
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, np.inf)


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
    return FoldMoments(moments.gram[:, index][:, :, index], None if moments.cross is None else moments.cross[:, index],
                       moments.yy, moments.rows, moments.source_sums[:, index], moments.source_rows,
                       moments.bias and bool(index[-1] == moments.gram.shape[1] - 1))


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
