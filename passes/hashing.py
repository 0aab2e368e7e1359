"""Data-free adaptive hashing (RED, METHODS.md §2.1): every weight of a layer becomes the mode of its KDE bin.

Per layer (Conv, Gemm and MatMul weights; per output neuron with ``per_neuron``), a Gaussian kernel density
estimate of the scalar weights is evaluated on a fine grid; the density's local minima cut the real line into
bins and each weight is replaced by its bin's mode, the density maximum inside it.  ``bandwidth`` is scipy's
``bw_method`` scalar: the kernel's standard deviation is ``bandwidth * std(weights)``; the larger it is, the
fewer modes and distinct values remain.

The density is not summed point by point (millions of weights times thousands of grid points): the weights
are linearly binned onto the grid and the histogram is smoothed with the same Gaussian kernel.  On a grid of
at least ``GRID_PER_SIGMA`` points per kernel standard deviation this is scipy's ``gaussian_kde`` to within
about 1e-3 of the peak density (`kde_density` is tested against it), for every weight of every layer, with no
subsampling.

Requires: constant weights (a normalised model).  Ensures (checked): the same graph with new weight values,
no hashed tensor holding more distinct values than before, onnx.checker passes, outputs unchanged, the input
model not mutated.  ``details``: per hashed tensor its distinct values before and after (``layers``), and the
totals.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.ndimage import gaussian_filter1d

from onnx_prune.analysis.layers import weight_axes
from onnx_prune.passes.base import Pass, PassResult, PostconditionError, copy_model

DEFAULT_BANDWIDTH = 0.005  # benchmarks/red_bandwidth.py: the largest with >= 99 % top-1 agreement
GRID_PER_SIGMA = 4          # grid points per kernel standard deviation
MAX_GRID = 1 << 20          # grid points per KDE at most (the step grows beyond)
CHUNK = 1 << 21             # grid points evaluated at once (per-neuron KDEs go in chunks of rows)
TAILS = 4.0                 # the grid reaches this many kernel deviations beyond the extreme weights
TRUNCATE = 5.0              # the smoothing kernel is cut at this many deviations
HASHED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Grid:
    start: float
    step: float
    size: int

    def points(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.size)


def kernel_sigma(values: np.ndarray, bandwidth: float) -> float:
    """scipy's kernel deviation for a scalar ``bw_method``: bandwidth x the unbiased standard deviation."""
    return float(bandwidth * np.std(values, ddof=1)) if len(values) > 1 else 0.0


def density_grid(values: np.ndarray, sigma: float) -> Grid:
    """The grid one KDE is evaluated on: GRID_PER_SIGMA points per sigma, TAILS sigmas beyond the values."""
    lo, hi = float(values.min()) - TAILS * sigma, float(values.max()) + TAILS * sigma
    size = int(min(np.ceil((hi - lo) / sigma * GRID_PER_SIGMA) + 1, MAX_GRID))
    return Grid(lo, (hi - lo) / (size - 1), size)


def smoothed_counts(positions: np.ndarray, size: int, sigma_steps: float) -> np.ndarray:
    """Per row of `positions` (in grid steps), the linearly binned counts on a grid of `size` points smoothed
    by a Gaussian of `sigma_steps` steps: the unnormalised KDE of that row."""
    rows = len(positions)
    left = np.clip(np.floor(positions).astype(np.int64), 0, size - 2)
    right_share = (positions - left).ravel()
    flat = (left + size * np.arange(rows)[:, None]).ravel()
    counts = np.bincount(flat, 1.0 - right_share, rows * size) + np.bincount(flat + 1, right_share, rows * size)
    return gaussian_filter1d(counts.reshape(rows, size), sigma_steps, axis=1, mode="constant", truncate=TRUNCATE)


def kde_density(values: np.ndarray, sigma: float, grid: Grid) -> np.ndarray:
    """Gaussian KDE of `values` (kernel deviation `sigma`) at the grid points, by linear binning + smoothing."""
    positions = ((values - grid.start) / grid.step)[None, :]
    return smoothed_counts(positions, grid.size, sigma / grid.step)[0] / (len(values) * grid.step)


def mode_of_bins(density: np.ndarray) -> np.ndarray:
    """Per row of a (rows, grid) density, the grid index of each point's bin mode; bins end at local minima."""
    rows, size = density.shape
    rising = np.diff(density, axis=1) > 0
    is_start = np.zeros((rows, size), dtype=bool)
    is_start[:, 0] = True  # each row's first bin, then wherever the density turns from falling to rising
    is_start[:, 1:-1] = rising[:, 1:] & ~rising[:, :-1]
    flat = density.ravel()
    starts = np.flatnonzero(is_start)
    bin_of = np.cumsum(is_start.ravel()) - 1
    at_peak = flat == np.maximum.reduceat(flat, starts)[bin_of]
    first_peak = np.minimum.reduceat(np.where(at_peak, np.arange(flat.size), flat.size), starts)
    return (first_peak[bin_of] - size * np.repeat(np.arange(rows), size)).reshape(rows, size)


def hash_rows(rows: np.ndarray, bandwidth: float) -> np.ndarray:
    """Each row of a 2-D array hashed by its own KDE: every element becomes the mode of its bin."""
    values = rows.astype(np.float64)  # a copy, hashed in place
    sigma = bandwidth * (values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(values)))
    live = np.nonzero(sigma > 0)[0]  # constant rows have nothing to hash
    if not len(live):
        return values.astype(rows.dtype)
    lo = values[live].min(axis=1) - TAILS * sigma[live]
    spans = (values[live].max(axis=1) - lo) / sigma[live] + TAILS  # in sigmas
    per_sigma = min(GRID_PER_SIGMA, (MAX_GRID - 1) / spans.max())
    size = int(np.ceil(spans.max() * per_sigma)) + 1
    step = max(1, CHUNK // size)
    for begin in range(0, len(live), step):
        chunk = slice(begin, begin + step)
        index = live[chunk]
        positions = values[index]
        positions -= lo[chunk, None]
        positions *= (per_sigma / sigma[index])[:, None]  # in grid steps
        modes = mode_of_bins(smoothed_counts(positions, size, per_sigma))
        nearest = np.clip(np.rint(positions).astype(np.int64), 0, size - 1)
        mode_steps = np.take_along_axis(modes, nearest, axis=1)
        values[index] = lo[chunk, None] + mode_steps * (sigma[index] / per_sigma)[:, None]
    return values.astype(rows.dtype)


def hash_values(values: np.ndarray, bandwidth: float) -> np.ndarray:
    """`values` (any shape) with every element replaced by the mode of its KDE bin (same dtype)."""
    return hash_rows(values.reshape(1, -1), bandwidth).reshape(values.shape)


def output_axis(node: onnx.NodeProto, ndim: int = 2) -> int:
    """The axis of a node's weight that indexes output neurons."""
    return weight_axes(node, ndim)[0]


@dataclass
class HashedLayer:
    param: str          # initializer name
    node: str           # the (first) node reading it
    size: int           # number of weights
    before: int         # distinct values before hashing
    after: int          # distinct values after

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class HashWeightsPass(Pass):
    """Hash every Conv/Gemm/MatMul weight (and, with ``biases``, their bias vectors, as layers of their own)."""
    bandwidth: float = DEFAULT_BANDWIDTH
    per_neuron: bool = False
    biases: bool = False

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")

    def call(self, model: onnx.ModelProto) -> PassResult:
        model = copy_model(model)
        inits = {t.name: t for t in model.graph.initializer}
        layers, done = [], set()
        for node in model.graph.node:
            if node.op_type not in HASHED_OPS or len(node.input) < 2:
                continue
            weight_rank = len(inits[node.input[1]].dims) if node.input[1] in inits else 2
            targets = [(node.input[1], output_axis(node, weight_rank))]
            if self.biases and len(node.input) > 2 and node.op_type != "MatMul":
                targets.append((node.input[2], None))
            for name, axis in targets:
                if name not in inits or name in done or inits[name].data_type != onnx.TensorProto.FLOAT:
                    continue
                done.add(name)
                weight = numpy_helper.to_array(inits[name])
                hashed = self._hash_tensor(weight, axis if weight.ndim > 1 else None)
                inits[name].CopyFrom(numpy_helper.from_array(hashed, name))
                layers.append(HashedLayer(name, node.name, int(weight.size), _distinct(weight), _distinct(hashed)))
        details = {"layers": [layer.to_dict() for layer in layers],
                   "distinct_before": sum(layer.before for layer in layers),
                   "distinct_after": sum(layer.after for layer in layers)}
        return PassResult(model, any(layer.before != layer.after for layer in layers), details)

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        super().ensures(before, result)
        grown = [layer["param"] for layer in result.details["layers"] if layer["after"] > layer["before"]]
        if grown:
            raise PostconditionError(f"{self.name}: more distinct values after hashing in {', '.join(grown)}")

    def _hash_tensor(self, weight: np.ndarray, axis: int | None) -> np.ndarray:
        if not self.per_neuron or axis is None:
            return hash_values(weight, self.bandwidth)
        rows = np.moveaxis(weight, axis, 0)
        hashed = hash_rows(rows.reshape(len(rows), -1), self.bandwidth).reshape(rows.shape)
        return np.ascontiguousarray(np.moveaxis(hashed, 0, axis))


def _distinct(array: np.ndarray) -> int:
    return int(len(np.unique(array)))
