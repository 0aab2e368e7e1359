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

Requires: constant weights (a normalised model).  Ensures: the same graph with new weight values; the input
model is not mutated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.ndimage import gaussian_filter1d

from onnx_prune.passes.base import PassResult, copy_model

DEFAULT_BANDWIDTH = 0.02
GRID_PER_SIGMA = 4          # grid points per kernel standard deviation
MIN_GRID, MAX_GRID = 256, 1 << 18
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
    lo, hi = float(values.min()) - TAILS * sigma, float(values.max()) + TAILS * sigma
    size = int(np.clip(np.ceil((hi - lo) / sigma * GRID_PER_SIGMA) + 1, MIN_GRID, MAX_GRID))
    return Grid(lo, (hi - lo) / (size - 1), size)


def kde_density(values: np.ndarray, sigma: float, grid: Grid) -> np.ndarray:
    """Gaussian KDE of `values` (kernel deviation `sigma`) at the grid points, by linear binning + smoothing."""
    position = (values - grid.start) / grid.step
    left = np.clip(np.floor(position).astype(np.int64), 0, grid.size - 2)
    right_share = position - left
    counts = np.bincount(left, 1.0 - right_share, grid.size) + np.bincount(left + 1, right_share, grid.size)
    smoothed = gaussian_filter1d(counts, sigma / grid.step, mode="constant", truncate=TRUNCATE)
    return smoothed / (len(values) * grid.step)


def mode_of_bins(density: np.ndarray) -> np.ndarray:
    """For every grid point, the grid index of its bin's mode; bins end at the density's local minima."""
    rising = np.diff(density) > 0
    # a bin starts where the density turns from falling (or flat) to rising: at its local minima
    starts = np.concatenate([[0], np.nonzero(rising[1:] & ~rising[:-1])[0] + 1])
    bin_of = np.cumsum(np.isin(np.arange(len(density)), starts)) - 1
    peak = np.maximum.reduceat(density, starts)
    at_peak = density == peak[bin_of]
    first_peak = np.minimum.reduceat(np.where(at_peak, np.arange(len(density)), len(density)), starts)
    return first_peak[bin_of]


def hash_values(values: np.ndarray, bandwidth: float) -> np.ndarray:
    """`values` (any shape) with every element replaced by the mode of its KDE bin (same dtype)."""
    flat = values.astype(np.float64).ravel()
    sigma = kernel_sigma(flat, bandwidth)
    if not sigma > 0:
        return values.copy()
    grid = density_grid(flat, sigma)
    modes = grid.points()[mode_of_bins(kde_density(flat, sigma, grid))]
    nearest = np.clip(np.rint((flat - grid.start) / grid.step).astype(np.int64), 0, grid.size - 1)
    return modes[nearest].astype(values.dtype).reshape(values.shape)


def output_axis(node: onnx.NodeProto) -> int:
    """The axis of a node's weight that indexes output neurons."""
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


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
class HashWeightsPass:
    """Hash every Conv/Gemm/MatMul weight (and, with ``biases``, their bias vectors, as layers of their own)."""
    bandwidth: float = DEFAULT_BANDWIDTH
    per_neuron: bool = False
    biases: bool = False

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        hashed, layers = self.hash(model)
        return PassResult(hashed, any(layer.before != layer.after for layer in layers))

    def hash(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[HashedLayer]]:
        """The hashed model and, per hashed tensor, how many distinct values it holds before and after."""
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        model = copy_model(model)
        inits = {t.name: t for t in model.graph.initializer}
        layers, done = [], set()
        for node in model.graph.node:
            if node.op_type not in HASHED_OPS or len(node.input) < 2:
                continue
            targets = [(node.input[1], output_axis(node))]
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
        return model, layers

    def _hash_tensor(self, weight: np.ndarray, axis: int | None) -> np.ndarray:
        if not self.per_neuron or axis is None:
            return hash_values(weight, self.bandwidth)
        rows = np.moveaxis(weight, axis, 0)
        return np.moveaxis(np.stack([hash_values(row, self.bandwidth) for row in rows]), 0, axis)


def _distinct(array: np.ndarray) -> int:
    return int(len(np.unique(array)))
