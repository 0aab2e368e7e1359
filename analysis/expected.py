"""What a group's consumers read, channel by channel: mean and variance, data-free or measured.

Two small layers:

- `activation_moments(kind, mu, sigma, params)`: mean and variance of f(z), z ~ N(mu, sigma^2), vectorised over
  channels.  Closed forms for identity, Relu, Clip (any bounds; ReLU6 is Clip(0, 6)), LeakyRelu, PRelu and
  HardSigmoid; Gauss-Hermite quadrature (`POINTS` nodes) for the smooth functions (Sigmoid, Tanh, SiLU/Swish,
  Gelu, ...) and Simpson's rule on a dense grid for the kinked ones (HardSwish, Elu, ...), where Gauss-Hermite
  converges slowly.
- `channel_statistics(prepared, group_ids=None, calib=None)`: for every channel of every group, the mean and
  variance of the value the group's CONSUMERS (Conv/Gemm/MatMul input side) read, and where they come from:

  * ``"bn"`` (data-free): the tensor a consumer reads is followed back to the nearest BatchNormalization (or
    InstanceNormalization); its output is taken as z ~ N(beta, gamma^2) per channel -- what the running
    statistics promise -- and pushed forward through the elementwise ops in between (activations, per-channel
    affine constants, x * sigmoid(x) patterns evaluated jointly on the same z), pooling (mean kept, variance
    kept as an upper bound) and depthwise carriers (mean * sum of the kernel + bias).
  * ``"propagated"`` (data-free, default where no BatchNorm is left, as in every TorchScript eval export, which
    folds BN into the convs): moments pushed from normalised inputs (zero mean, unit variance) through the
    linear layers too -- means exactly, variances for independent channels whose pixels move together
    within a kernel window.
  * ``"measured"`` (``calib`` feeds given) or ``"synthetic"`` (``estimate="synthetic"``, and whatever
    propagation cannot follow): onnxruntime runs the model with the consumer-read tensors as extra outputs and
    accumulates per-position sums and sums of squares (memory bounded by one batch).  Synthetic inputs are
    1/f ("pink") noise images, see `synthetic_inputs`.

  Whatever the source, a channel that is deterministic -- its producer rows are all zero (it carries its bias),
  or a BatchNorm with gamma = 0 makes it beta -- is recognised by the same forward pass: its mean is that value,
  exactly, and its variance 0, whatever the BN running statistics say.  This keeps the zero-channel invariant
  exact with compensation on.

The result is plain data (`GroupStatistics`): per group the C-vectors ``mean``, ``var`` and ``deterministic``
(averaged over the group's consumer reads), and ``reads``: the same per consumer node, because consumers of a
residual stream read different tensors (x1, x1 + x2, ...) with different means.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.special import erf, ndtr

from onnx_prune.analysis.layers import weight_axes
from onnx_prune.runtime.io import CACHED_WEIGHT_BYTES

POINTS = 40  # Gauss-Hermite nodes, for the smooth activations (exact to ~1e-6 at unit-scale inputs)
DENSE_POINTS = 1201  # Simpson nodes on [-DENSE_RANGE, DENSE_RANGE] standard deviations, for kinked functions
DENSE_RANGE = 12.0
SQRT2 = math.sqrt(2.0)
_PHI_CLIP = 40.0  # standardised bounds beyond this are +-infinity for float64 Phi and phi


# --- elementwise functions and their moments under a Gaussian -----------------------------------------

def _col(value, like: np.ndarray):
    """A per-channel parameter (scalar or C-vector) shaped to broadcast against `like` ((C,) or (C, Q))."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 1 and like.ndim == 2:
        return value[:, None]
    return value


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _clip(x, p):
    return np.clip(x, _col(p.get("min", -np.inf), x), _col(p.get("max", np.inf), x))


def _leaky(x, p):
    return np.where(x >= 0, x, _col(p.get("alpha", 0.01), x) * x)


def _gelu(x, p):
    if p.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + erf(x / SQRT2))


def _elu(x, alpha):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def _softplus(x):
    return np.logaddexp(0.0, x)


ACTIVATIONS = {
    "Identity": lambda x, p: x,
    "Dropout": lambda x, p: x,       # inference: identity
    "Cast": lambda x, p: x,          # float to float only (checked where read)
    "Relu": lambda x, p: np.maximum(x, 0.0),
    "LeakyRelu": _leaky,
    "PRelu": lambda x, p: np.where(x >= 0, x, _col(p["slope"], x) * x),
    "Clip": _clip,
    "Sigmoid": lambda x, p: _sigmoid(x),
    "HardSigmoid": lambda x, p: np.clip(p.get("alpha", 0.2) * x + p.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, p: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, p: np.tanh(x),
    "Elu": lambda x, p: _elu(x, p.get("alpha", 1.0)),
    "Celu": lambda x, p: np.maximum(x, 0.0) + np.minimum(0.0, p.get("alpha", 1.0) * np.expm1(
        np.minimum(x, 0.0) / p.get("alpha", 1.0))),
    "Selu": lambda x, p: p.get("gamma", 1.0507009873554805) * _elu(x, p.get("alpha", 1.6732632423543772)),
    "Softplus": lambda x, p: _softplus(x),
    "Softsign": lambda x, p: x / (1.0 + np.abs(x)),
    "Mish": lambda x, p: x * np.tanh(_softplus(x)),
    "Gelu": _gelu,
    "Erf": lambda x, p: erf(x),
    "Exp": lambda x, p: np.exp(x),
    "Abs": lambda x, p: np.abs(x),
    "Neg": lambda x, p: -x,
    "ThresholdedRelu": lambda x, p: np.where(x > p.get("alpha", 1.0), x, 0.0),
    "Shrink": lambda x, p: np.where(x < -p.get("lambd", 0.5), x + p.get("bias", 0.0),
                                    np.where(x > p.get("lambd", 0.5), x - p.get("bias", 0.0), 0.0)),
    "Sin": lambda x, p: np.sin(x),
    "Cos": lambda x, p: np.cos(x),
    "Swish": lambda x, p: x * _sigmoid(p.get("alpha", 1.0) * x),  # opset 24; also the x * Sigmoid(x) pattern
}


def _phi(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _interval_moments(mu, sigma, lo, hi):
    """Integrals of p(z), z p(z), z^2 p(z) over [lo, hi] for z ~ N(mu, sigma^2) (sigma > 0)."""
    a = np.clip((lo - mu) / sigma, -_PHI_CLIP, _PHI_CLIP)
    b = np.clip((hi - mu) / sigma, -_PHI_CLIP, _PHI_CLIP)
    mass = ndtr(b) - ndtr(a)
    pa, pb = _phi(a), _phi(b)
    first = mu * mass + sigma * (pa - pb)
    second = (mu * mu + sigma * sigma) * mass + 2.0 * mu * sigma * (pa - pb) + sigma * sigma * (a * pa - b * pb)
    return mass, first, second


def _clip_moments(mu, sigma, lo, hi):
    """E and E[.^2] of clip(z, lo, hi): the constant tails plus the Gaussian's middle."""
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), mu.shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), mu.shape)
    below = ndtr(np.clip((lo - mu) / sigma, -_PHI_CLIP, _PHI_CLIP))
    above = 1.0 - ndtr(np.clip((hi - mu) / sigma, -_PHI_CLIP, _PHI_CLIP))
    _, first, second = _interval_moments(mu, sigma, lo, hi)
    lo_v, hi_v = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    mean = lo_v * below + hi_v * above + first
    square = lo_v ** 2 * below + hi_v ** 2 * above + second
    return mean, square


def _leaky_moments(mu, sigma, alpha):
    """f = relu(z) - alpha relu(-z); the two parts never overlap, so E[f^2] has no cross term."""
    pos_m, pos_s = _clip_moments(mu, sigma, 0.0, np.inf)
    neg_m, neg_s = _clip_moments(-mu, sigma, 0.0, np.inf)
    alpha = np.asarray(alpha, dtype=np.float64)
    return pos_m - alpha * neg_m, pos_s + alpha * alpha * neg_s


def _closed_form(kind: str, mu, sigma, p):
    if kind in ("Identity", "Dropout", "Cast"):
        return mu, mu * mu + sigma * sigma
    if kind == "Relu":
        return _clip_moments(mu, sigma, 0.0, np.inf)
    if kind == "Clip":
        return _clip_moments(mu, sigma, p.get("min", -np.inf), p.get("max", np.inf))
    if kind == "LeakyRelu":
        return _leaky_moments(mu, sigma, p.get("alpha", 0.01))
    if kind == "PRelu":
        return _leaky_moments(mu, sigma, p["slope"])
    if kind == "Neg":
        return -mu, mu * mu + sigma * sigma
    if kind == "HardSigmoid":  # clip(a z + b, 0, 1) with a z + b ~ N(a mu + b, (a sigma)^2)
        alpha, beta = p.get("alpha", 0.2), p.get("beta", 0.5)
        if alpha != 0:
            return _clip_moments(alpha * mu + beta, abs(alpha) * sigma, 0.0, 1.0)
    return None


SMOOTH = {"Sigmoid", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Sin", "Cos", "Swish"}


def gauss_hermite_moments(fn, mu, sigma, points: int = POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of fn(z), z ~ N(mu, sigma^2) per channel; `fn` maps a (C, Q) grid elementwise."""
    nodes, weights = np.polynomial.hermite.hermgauss(points)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    grid = mu[:, None] + SQRT2 * sigma[:, None] * nodes[None, :]
    values = fn(grid)
    w = weights / math.sqrt(math.pi)
    mean = values @ w
    return mean, np.maximum((values * values) @ w - mean * mean, 0.0)


def dense_moments(fn, mu, sigma, points: int = DENSE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """As `gauss_hermite_moments`, by Simpson's rule on a dense grid of standardised values: Gauss-Hermite
    converges slowly where f has kinks (HardSwish, Elu, clipped compositions); this does not care."""
    t = np.linspace(-DENSE_RANGE, DENSE_RANGE, points)
    simpson = np.ones(points)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    w = simpson * (t[1] - t[0]) / 3.0 * _phi(t)
    w /= w.sum()
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    values = fn(mu[:, None] + sigma[:, None] * t[None, :])
    mean = values @ w
    return mean, np.maximum((values * values) @ w - mean * mean, 0.0)


def activation_moments(kind: str, mu, sigma, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) of f(z) for z ~ N(mu, sigma^2), per channel (mu, sigma: scalars or C-vectors).

    `kind` is an ONNX op type in `ACTIVATIONS`; `params` its attributes by ONNX name (``alpha``, ``beta``,
    ``min``/``max`` for Clip, ``slope`` for PRelu as a scalar or C-vector).  sigma = 0 gives (f(mu), 0) exactly.
    """
    if kind not in ACTIVATIONS:
        raise KeyError(f"no moments for '{kind}'")
    params = params or {}
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.abs(np.broadcast_to(np.asarray(sigma, dtype=np.float64), mu.shape))
    fn = ACTIVATIONS[kind]
    degenerate = sigma == 0
    safe = np.where(degenerate, 1.0, sigma)
    closed = _closed_form(kind, mu, safe, params)
    if closed is not None:
        mean, square = closed
        var = np.maximum(square - mean * mean, 0.0)
    else:
        quadrature = gauss_hermite_moments if kind in SMOOTH else dense_moments
        mean, var = quadrature(lambda x: fn(x, params), mu, safe)
    if degenerate.any():
        exact = np.asarray(fn(mu[:, None], params), dtype=np.float64).reshape(mu.shape)
        mean = np.where(degenerate, exact, mean)
        var = np.where(degenerate, 0.0, var)
    return mean, var


# --- what each tensor carries, pushed forward through the graph -------------------------------------

@dataclass
class Carried:
    """What is known about the channels of one tensor, per position of its channel layout.

    ``const``: the deterministic value (NaN where the channel varies).  Otherwise the value is ``expr``
    applied elementwise to z ~ N(mu, sigma^2), a Gaussian named ``base`` (the BatchNorm output it starts from,
    or a tensor where moments were collapsed); two values on the same base are evaluated jointly (x * sigmoid(x)).
    mu = NaN: nothing is known (no BatchNorm upstream): measure it.
    """
    const: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    base: str | None = None
    expr: tuple = ("z",)

    @classmethod
    def unknown(cls, n: int) -> "Carried":
        nan = np.full(n, np.nan)
        return cls(nan, nan.copy(), nan.copy())

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-position (mean, var); NaN where unknown; (const, 0) where deterministic."""
        mean, var = np.full(len(self.mu), np.nan), np.full(len(self.mu), np.nan)
        known = np.isfinite(self.mu) & np.isfinite(self.sigma)
        if known.any():
            mean[known], var[known] = _expr_moments(self.expr, self.mu[known], self.sigma[known], known)
        fixed = np.isfinite(self.const)
        mean[fixed], var[fixed] = self.const[fixed], 0.0
        return mean, var

    def collapsed(self, name: str) -> "Carried":
        """The same moments as a Gaussian of its own (before positions are rearranged or pooled)."""
        mean, var = self.moments()
        return Carried(self.const.copy(), mean, np.sqrt(var), name)


def _select(value, mask):
    """A per-position parameter restricted to `mask`; scalars and strings pass."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value[mask]
    return value


def _expr_moments(expr: tuple, mu, sigma, mask):
    if expr == ("z",):
        return mu, sigma * sigma
    if expr[0] == "act" and expr[3] == ("z",):
        params = {k: _select(v, mask) for k, v in expr[2].items()}
        return activation_moments(expr[1], mu, sigma, params)
    fn = _compile(expr, mask)
    degenerate = sigma == 0
    mean, var = dense_moments(fn, mu, np.where(degenerate, 1.0, sigma))
    if degenerate.any():
        mean = np.where(degenerate, fn(mu[:, None])[:, 0], mean)
        var = np.where(degenerate, 0.0, var)
    return mean, var


BINARY_FNS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
              "Max": np.maximum, "Min": np.minimum, "Pow": np.power}


def _compile(expr: tuple, mask):
    """expr -> function of a (P, Q) grid of z values (positions restricted to `mask`)."""
    tag = expr[0]
    if tag == "z":
        return lambda z: z
    if tag == "const":
        value = _select(expr[1], mask)
        return lambda z: np.broadcast_to(_col(value, z), z.shape)
    if tag == "act":
        kind, params, child = expr[1], {k: _select(v, mask) for k, v in expr[2].items()}, _compile(expr[3], mask)
        return lambda z: ACTIVATIONS[kind](child(z), params)
    op, left, right = BINARY_FNS[expr[1]], _compile(expr[2], mask), _compile(expr[3], mask)
    return lambda z: op(left(z), right(z))


def _apply_unary(kind: str, fn_params: dict, value: Carried) -> Carried:
    const = value.const.copy()
    fixed = np.isfinite(const)
    if fixed.any():
        params = {k: _select(v, fixed) for k, v in fn_params.items()}
        const[fixed] = ACTIVATIONS[kind](const[fixed][:, None], params)[:, 0]
    return Carried(const, value.mu, value.sigma, value.base, ("act", kind, fn_params, value.expr))


def _binary_moments(op: str, a: tuple, b: tuple):
    """Moments of a op b for independent a and b (None where not known in closed form)."""
    (ma, va), (mb, vb) = a, b
    if op == "Add":
        return ma + mb, va + vb
    if op == "Sub":
        return ma - mb, va + vb
    if op == "Mul":
        return ma * mb, va * vb + va * mb * mb + vb * ma * ma
    return None


# --- reading the graph: constants, attributes, per-position parameters

class _Graph:
    def __init__(self, model: onnx.ModelProto, analysis):
        self.model, self.analysis = model, analysis
        self.inits = {t.name: t for t in model.graph.initializer}
        self.graph_inputs = {i.name for i in model.graph.input} - set(self.inits)
        self.through_linear = False
        self._values: dict[str, np.ndarray] = {}
        self.ranks = {}
        for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
            if v.type.tensor_type.HasField("shape"):
                self.ranks[v.name] = len(v.type.tensor_type.shape.dim)

    def const(self, name: str) -> np.ndarray | None:
        if not name or name not in self.inits:
            return None
        cached = self._values.get(name)
        if cached is not None:
            return cached
        value = numpy_helper.to_array(self.inits[name]).astype(np.float64)
        if value.nbytes <= CACHED_WEIGHT_BYTES:  # a float64 copy of every weight would be 2x the model
            self._values[name] = value
        return value

    def per_position(self, name: str, out_name: str) -> np.ndarray | None:
        """A constant input as one value per position of the output's channel axis (None if it varies along
        another axis or cannot be aligned)."""
        value = self.const(name)
        lay = self.analysis.layouts.get(out_name)
        rank = self.ranks.get(out_name)
        if value is None or lay is None or rank is None:
            return None
        k = lay.axis - (rank - value.ndim)
        if k < 0:
            return np.full(len(lay.ids), float(value.reshape(-1)[0])) if value.size == 1 else None
        moved = np.moveaxis(value, k, 0).reshape(value.shape[k], -1)
        if moved.shape[1] and np.ptp(moved, axis=1).max(initial=0.0) != 0:
            return None
        column = moved[:, 0] if moved.shape[1] else np.zeros(value.shape[k])
        if len(column) == 1:
            return np.full(len(lay.ids), column[0])
        return column if len(column) == len(lay.ids) else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _activation_params(g: _Graph, node: onnx.NodeProto) -> dict | None:
    """ONNX attributes/constant inputs of an activation; None where they are not constant or not floats."""
    op = node.op_type
    if op == "Clip":
        if len(node.input) > 1:  # opset 11+: min and max are optional inputs
            bounds = {}
            for key, index in (("min", 1), ("max", 2)):
                name = node.input[index] if index < len(node.input) else ""
                if name:
                    value = g.const(name)
                    if value is None:
                        return None
                    bounds[key] = float(value.reshape(-1)[0])
            return bounds
        return {"min": _attr(node, "min", -np.inf), "max": _attr(node, "max", np.inf)}
    if op == "PRelu":
        slope = g.per_position(node.input[1], node.output[0])
        return None if slope is None else {"slope": slope}
    if op == "Cast":
        to = _attr(node, "to")
        return {} if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                            onnx.TensorProto.BFLOAT16) else None
    if op == "Dropout" and len(node.output) > 1 and node.output[1]:
        return None
    return {a.name: (_attr(node, a.name)) for a in node.attribute
            if a.name in ("alpha", "beta", "gamma", "lambd", "bias", "approximate")}


POOLS_KEEPING_MOMENTS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
MOVING = ("Concat", "Split", "Slice", "Gather", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
          "Resize", "Pad", "Identity")


def propagate(model: onnx.ModelProto, analysis, through_linear: bool = False) -> dict[str, Carried]:
    """`Carried` for every tensor that has a channel layout, walking the (sorted) graph once, data-free.
    `through_linear`: also push moments through Conv/Gemm/MatMul producers (`_linear_moments`), starting from
    normalised graph inputs, for channels no BatchNorm describes."""
    g = _Graph(model, analysis)
    g.through_linear = through_linear
    layouts = analysis.layouts
    carried: dict[str, Carried] = {}
    for node in model.graph.node:
        outs = [o for o in node.output if o and o in layouts]
        if not outs:
            continue
        try:
            results = _rule(g, node, carried)
        except (ValueError, IndexError, KeyError, FloatingPointError):  # shapes we do not follow: unknown
            results = {}
        for out in outs:
            value = results.get(out)
            n = len(layouts[out].ids)
            carried[out] = value if value is not None and len(value.mu) == n else Carried.unknown(n)
    return carried


def _rule(g: _Graph, node: onnx.NodeProto, carried: dict[str, Carried]) -> dict[str, Carried]:
    op, out = node.op_type, node.output[0]
    n_out = len(g.analysis.layouts[out].ids)
    inputs = [carried.get(name) for name in node.input]
    first = inputs[0] if inputs else None
    with np.errstate(all="ignore"):
        if op in ("BatchNormalization", "InstanceNormalization"):
            return {out: _normalization(g, node, first, n_out)}
        if op in ACTIVATIONS and first is not None:
            params = _activation_params(g, node)
            return {} if params is None else {out: _apply_unary(op, params, first)}
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return {out: _linear(g, node, first, n_out)}
        if op in POOLS_KEEPING_MOMENTS or (op == "ReduceMean" and first is not None):
            return {out: _pool(node, first)} if first is not None else {}
        if op in BINARY_FNS or op in ("Sum", "Mean"):
            return {out: _binary(g, node, inputs)}
        if op in MOVING:
            return _moved(g, node, carried)
    return {}


def _normalization(g: _Graph, node, value: Carried | None, n: int) -> Carried:
    """BN output: z ~ N(beta, gamma^2) by its running statistics; deterministic where the input is (or gamma = 0)."""
    scale, bias = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or bias is None or scale.size != n or bias.size != n:
        return Carried.unknown(n)
    scale, bias = scale.reshape(-1), bias.reshape(-1)
    const = np.where(scale == 0, bias, np.nan)
    if node.op_type == "BatchNormalization":
        mean, var = g.const(node.input[3]), g.const(node.input[4])
        if value is not None and mean is not None and var is not None:
            eps = _attr(node, "epsilon", 1e-5)
            through = (value.const - mean.reshape(-1)) * scale / np.sqrt(var.reshape(-1) + eps) + bias
            const = np.where(np.isfinite(value.const), through, const)
    elif value is not None:  # instance norm of a constant plane: (x - mean) = 0, the output is beta
        const = np.where(np.isfinite(value.const), bias, const)
    return Carried(const, bias.copy(), np.abs(scale), node.output[0])


def _linear(g: _Graph, node, value: Carried | None, n: int) -> Carried:
    """Producer outputs are unknown, except channels whose weights are all zero: they carry their bias.
    A depthwise Conv carries its input: mean * kernel sum + bias (spatial correlation taken as perfect)."""
    op = node.op_type
    weight = g.const(node.input[1])
    bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    result = Carried.unknown(n)
    if weight is None:
        return result
    if op == "Conv":
        rows = weight.reshape(weight.shape[0], -1)
        b = bias.reshape(-1) if bias is not None else np.zeros(weight.shape[0])
        group = _attr(node, "group", 1)
        if value is not None and weight.shape[1] == 1 and group == len(value.mu) and group > 1:
            return _depthwise(node, value, rows, b)
    elif op == "ConvTranspose":
        rows = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
        b = bias.reshape(-1) if bias is not None else np.zeros(weight.shape[1])
    elif op == "Gemm":
        rows = np.moveaxis(weight, weight_axes(node, 2)[0], 0)
        beta = _attr(node, "beta", 1.0)
        b = beta * np.broadcast_to(bias, (1, rows.shape[0])).reshape(-1) if bias is not None \
            else np.zeros(rows.shape[0])
    else:  # MatMul
        rows, b = weight.T, np.zeros(weight.shape[1])
    if g.through_linear:
        value = value if value is not None else _graph_input(g, node, weight)
        if value is not None and rows.shape[0] == n:
            result = _linear_moments(node, weight, rows, b, value, n)
    if rows.shape[0] == n:
        zero = ~np.any(rows != 0, axis=1)
        result.const[zero] = b[zero]
    return result


def _graph_input(g: _Graph, node, weight: np.ndarray) -> Carried | None:
    """A Conv reading a graph input: taken as normalised, zero mean and unit variance per channel."""
    if node.op_type != "Conv" or node.input[0] not in g.graph_inputs:
        return None
    size = weight.shape[1] * _attr(node, "group", 1)
    return Carried(np.full(size, np.nan), np.zeros(size), np.ones(size), node.input[0])


def _linear_moments(node, weight: np.ndarray, rows: np.ndarray, bias: np.ndarray, value: Carried,
                    n: int) -> Carried:
    """Moments through a linear layer from its input's: the mean exactly (sum over taps and inputs of W * m,
    plus the bias; zero-padded borders ignored), the variance as for independent input channels whose
    pixels move together within a kernel window (sum over inputs of (kernel sum)^2 * var)."""
    mean_in, var_in = value.moments()
    result = Carried.unknown(n)
    if node.op_type == "Conv":
        group, per = _attr(node, "group", 1), weight.shape[1]
        if per * group != len(mean_in):
            return result
        source = (np.arange(n) // (n // group))[:, None] * per + np.arange(per)[None, :]
        tapsum = weight.reshape(n, per, -1).sum(axis=2)
        mean = (tapsum * mean_in[source]).sum(axis=1) + bias
        var = (tapsum ** 2 * var_in[source]).sum(axis=1)
    elif node.op_type in ("Gemm", "MatMul") and rows.shape[1] == len(mean_in):
        mean, var = rows @ mean_in + bias, (rows ** 2) @ var_in
    else:
        return result
    return Carried(result.const, mean, np.sqrt(np.maximum(var, 0.0)), node.output[0])


def _no_padding(node) -> bool:
    pads = _attr(node, "pads", [])
    return not any(pads) and _attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")


def _depthwise(node, value: Carried, rows: np.ndarray, bias: np.ndarray) -> Carried:
    mult = rows.shape[0] // len(value.mu)
    mean, var = value.moments()
    source = np.arange(rows.shape[0]) // mult
    ksum = rows.sum(axis=1)
    out_mean = mean[source] * ksum + bias
    out_var = var[source] * ksum * ksum
    k = value.const[source]
    zero_rows = ~np.any(rows != 0, axis=1)
    const = np.where(zero_rows | (k == 0), bias, np.nan)
    if _no_padding(node):
        const = np.where(np.isfinite(k) & ~zero_rows & (k != 0), k * ksum + bias, const)
    return Carried(const, out_mean, np.sqrt(out_var), node.output[0])


def _pool(node, value: Carried) -> Carried:
    """Averages and maxima keep a channel's mean (max: approximately) and at most its variance: kept as is.
    A constant survives unless zero padding is averaged in."""
    result = value.collapsed(node.output[0])
    if node.op_type == "AveragePool" and _attr(node, "count_include_pad", 0) and not _no_padding(node):
        result.const = np.where(result.const == 0, 0.0, np.nan)
    return result


def _binary(g: _Graph, node, inputs: list[Carried | None]) -> Carried:
    op = {"Sum": "Add"}.get(node.op_type, node.op_type)
    out = node.output[0]
    n = len(g.analysis.layouts[out].ids)
    terms = []  # (Carried) or ("const", per-position array)
    for name, value in zip(node.input, inputs):
        if value is not None and len(value.mu) == n:
            terms.append(value)
            continue
        column = g.per_position(name, out)
        if column is None:
            return Carried.unknown(n)
        terms.append(Carried(column, column.copy(), np.zeros(n), None, ("const", column)))
    result = terms[0]
    for term in terms[1:]:
        result = _combine("Add" if op == "Mean" else op, result, term, out)
    if op == "Mean":
        share = np.full(n, 1.0 / len(terms))
        result = _combine("Mul", result, Carried(share, share.copy(), np.zeros(n), None, ("const", share)), out)
    return result


def _combine(op: str, a: Carried, b: Carried, out: str) -> Carried:
    fn = BINARY_FNS[op]
    const = fn(a.const, b.const)
    constant_a, constant_b = a.expr[0] == "const", b.expr[0] == "const"
    if constant_b or constant_a or (a.base is not None and a.base == b.base):
        # one Gaussian base: build the joint expression (x * sigmoid(x), x + 3, clip(..) / 6)
        base = a if not constant_a else b
        return Carried(const, base.mu, base.sigma, base.base, ("op", op, a.expr, b.expr))
    ma, mb = a.moments(), b.moments()
    joint = _binary_moments(op, ma, mb)
    if joint is None:
        return Carried(const, np.full(len(const), np.nan), np.full(len(const), np.nan))
    return Carried(const, joint[0], np.sqrt(np.maximum(joint[1], 0.0)), out)


def _moved(g: _Graph, node, carried: dict[str, Carried]) -> dict[str, Carried]:
    """Ops that rearrange positions: collapse the inputs to moments, then follow each channel id."""
    layouts = g.analysis.layouts
    sources = []
    for name in node.input:
        value, lay = carried.get(name), layouts.get(name)
        if value is None or lay is None:
            continue
        mean, var = value.moments()
        sources.append((lay.ids, mean, var, value.const))
    results = {}
    if node.op_type == "Concat" and len(sources) == len(node.input) and node.output[0] in layouts and \
            sum(len(ids) for ids, *_ in sources) == len(layouts[node.output[0]].ids):
        # along the channel axis: position by position (the same channel may come twice, e.g. silu and x)
        mean, var, const = (np.concatenate([source[k] for source in sources]) for k in (1, 2, 3))
        return {node.output[0]: Carried(const, mean, np.sqrt(var), node.output[0])}
    for out in node.output:
        lay = layouts.get(out)
        if lay is None or not sources:
            continue
        n = len(lay.ids)
        mean, var, const = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        for ids, m, v, c in reversed(sources):  # the first input wins where ids repeat
            index = {int(i): p for p, i in enumerate(ids)}
            found = np.array([index.get(int(i), -1) for i in lay.ids])
            hit = found >= 0
            mean[hit], var[hit], const[hit] = m[found[hit]], v[found[hit]], c[found[hit]]
        if node.op_type == "Pad" and _attr(node, "mode", "constant") == "constant":
            const = np.where(const == 0, 0.0, np.nan)  # zero borders keep only a zero channel constant
        results[out] = Carried(const, mean, np.sqrt(var), out)
    return results


# --- per-group statistics of what consumers read ----------------------------------------------------

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAMPLES, BATCH = 32, 8
RGB_CORRELATION = 0.85  # share of a pixel's variance common to the three colour channels in natural photos


def pink_noise(rng: np.random.Generator, batch: int, channels: int, height: int, width: int,
               exponent: float = 1.0) -> np.ndarray:
    """``[batch, channels, height, width]`` noise with a 1/f^exponent amplitude spectrum, unit variance over the
    batch; colour channels share `RGB_CORRELATION` of their variance, as the colour planes of photos do."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0 / max(height, width)  # the image mean varies like the lowest frequency: brightness differs
    amplitude = f ** -exponent

    def field(n: int) -> np.ndarray:
        white = rng.standard_normal((n, height, width))
        out = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(height, width))
        return out / out.std()

    shared = field(batch)
    planes = [math.sqrt(RGB_CORRELATION) * shared + math.sqrt(1 - RGB_CORRELATION) * field(batch)
              for _ in range(channels)] if channels > 1 else [shared]
    return np.stack(planes, axis=1)


def synthetic_inputs(model: onnx.ModelProto, samples: int = SAMPLES, batch: int = BATCH, seed: int = 0,
                     normalization: tuple | None = None, shapes: dict | None = None) -> list[dict]:
    """Natural-image-like feeds for measuring channel statistics without data.

    Why 1/f noise: photos have a power spectrum close to 1/f^2 (amplitude 1/f): large smooth regions, edges at
    every scale, and colour channels that move together.  Convolutional features respond to that structure;
    white N(0, 1) noise is all fine detail, drives early filters into regimes real images never reach and gave
    means far from real ones (issue 15: 0.40 top-1 agreement against 0.62 from BatchNorm statistics).
    An image input (float, [N, C, H, W], C <= 4) gets pixels ``mean + std * noise`` clipped to [0, 1] and is then
    normalised with (mean, std) -- the dataset's pixel statistics are exactly what normalisation constants are.
    `normalization` = (means, stds) per channel; default ImageNet's for 3 channels, else the noise is fed as is
    (zero mean, unit variance: what a standardised input looks like).  Other inputs are standard normal.
    """
    from onnx_prune.runtime.sessions import input_specs, resolve_input_shapes

    specs = input_specs(model)
    rng = np.random.default_rng(seed)
    feeds, produced = [], 0
    while produced < samples:  # a fixed batch dim in the model wins over `batch`
        concrete = resolve_input_shapes(specs, shapes, min(batch, samples - produced))
        feed = {}
        for spec in specs:
            dims = list(concrete[spec.name])
            if spec.dtype.kind != "f":
                feed[spec.name] = np.zeros(dims, dtype=spec.dtype)
                continue
            if len(dims) == 4 and dims[1] <= 4 and min(dims[2:]) >= 8:
                noise = pink_noise(rng, dims[0], dims[1], dims[2], dims[3])
                norm = normalization or (IMAGENET_NORMALIZATION if dims[1] == 3 else None)
                if norm is not None:
                    mean = np.asarray(norm[0], dtype=np.float64).reshape(1, -1, 1, 1)
                    std = np.asarray(norm[1], dtype=np.float64).reshape(1, -1, 1, 1)
                    noise = (np.clip(mean + std * noise, 0.0, 1.0) - mean) / std
                feed[spec.name] = noise.astype(spec.dtype)
            else:
                feed[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        feeds.append(feed)
        produced += max((v.shape[0] for v in feed.values() if v.ndim), default=1)
    return feeds


@dataclass
class ReadStatistics:
    """What one consumer node reads of a group: C-vectors (NaN where it does not read the channel)."""
    node: str
    tensor: str
    mean: np.ndarray
    var: np.ndarray
    deterministic: np.ndarray
    source: str
    activated: bool = True  # the tensor is an activation's output (see `is_activated`)


@dataclass
class GroupStatistics:
    """Per channel of a group: mean and variance of what its consumers read (averaged over consumer reads
    where they differ, e.g. along a residual stream; the per-consumer values are in `reads`), whether the value
    is deterministic (then `var` is 0 and `mean` exact), and the source: "bn" (data-free, BatchNorm statistics),
    "propagated" (data-free, moments pushed through the linear layers from normalised inputs),
    "measured" (calibration feeds), "synthetic" (1/f noise inputs), "constant" (every channel deterministic),
    "unmeasured" (synthetic inputs could not be built: an input size is open and no `shapes` were given; the
    channels no BatchNorm describes stay NaN), "none" (no consumer reads the group: nothing to compensate)."""
    group: int
    mean: np.ndarray
    var: np.ndarray
    deterministic: np.ndarray
    source: str
    reads: dict[str, ReadStatistics] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"group": self.group, "source": self.source, "deterministic": int(self.deterministic.sum()),
                "mean_abs": float(np.nanmean(np.abs(self.mean))) if np.isfinite(self.mean).any() else None,
                "consumers": sorted(self.reads)}


def channel_statistics(prepared, group_ids=None, calib=None, *, samples: int = SAMPLES, batch: int = BATCH,
                       seed: int = 0, normalization: tuple | None = None,
                       shapes: dict | None = None, synthetic: bool = True,
                       estimate: str = "propagate") -> dict[int, GroupStatistics]:
    """`GroupStatistics` for every group in `group_ids` (default: all) of a `pipeline.Prepared` model.

    `calib`: calibration feeds (a list of input dicts) or an .npz path; given, every varying channel is
    measured on them.  Without, channels that a BatchNorm describes are computed data-free and the rest are
    measured on `synthetic_inputs(samples, batch, seed, normalization, shapes)`.  Deterministic channels are
    exact either way.  `synthetic=False`: without `calib`, nothing is measured (channels no BatchNorm describes
    stay unknown, source "unmeasured").  Memory: one batch of the read tensors plus per-position sums.

    `estimate` (without `calib`, for channels no BatchNorm describes -- a BN-fused export):
    ``"propagate"`` (default) pushes moments from normalised inputs through the linear layers
    (`_linear_moments`; source "propagated"), measuring on synthetic inputs only what that cannot follow;
    ``"synthetic"`` measures them all on synthetic inputs.  On the pretrained MobileNetV2 (BN fused) the
    propagated means compensated better than the synthetic ones (benchmarks/compensation.py).
    """
    if estimate not in ("propagate", "synthetic"):
        raise ValueError(f"estimate must be 'propagate' or 'synthetic', not {estimate!r}")
    model, analysis = prepared.model, prepared.analysis
    groups = analysis.groups if group_ids is None else [analysis.groups[g] for g in group_ids]
    from_bn = propagate(model, analysis)
    carried = propagate(model, analysis, through_linear=True) if estimate == "propagate" and calib is None \
        else from_bn
    data_input = {n.name: n.input[0] for n in model.graph.node if n.input}
    reads_of: dict[int, dict[str, str]] = {}
    to_measure: set[str] = set()
    for group in groups:
        reads = {node: data_input[node] for node in sorted({m.node for m in group.by_role("consumer")})
                 if data_input.get(node) in analysis.layouts}
        reads_of[group.id] = reads
        for tensor in reads.values():
            lay = analysis.layouts[tensor]
            mine = analysis.id_group[lay.ids] == group.id
            value = carried.get(tensor, Carried.unknown(len(lay.ids)))
            varying = mine & ~np.isfinite(value.const)
            if varying.any() and (calib is not None or not np.isfinite(value.mu[varying]).all()):
                to_measure.add(tensor)
    measured: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kind = "measured" if calib is not None else "synthetic"
    if to_measure and calib is None and not synthetic:
        to_measure, kind = set(), "unmeasured"
    if to_measure:
        try:
            feeds = _calibration_feeds(calib, model) if calib is not None else \
                synthetic_inputs(model, samples, batch, seed, normalization, shapes)
        except ValueError:
            if calib is not None:
                raise
            feeds, kind = [], "unmeasured"  # an input size left open (no `shapes`): what is unknown stays so
        if feeds:
            try:
                measured = measure_moments(model, analysis, sorted(to_measure), feeds)
            except Exception:  # noqa: BLE001 - onnxruntime cannot run this model (custom ops, huge tensors):
                if calib is not None:  # statistics stay unknown, criteria fall back, nothing is compensated
                    raise
                measured, kind = {}, "unmeasured"
    producers = {o: n for n in model.graph.node for o in n.output}
    return {group.id: _group_statistics(analysis, group, reads_of[group.id], carried, from_bn, measured, kind,
                                        producers)
            for group in groups}


LINEAR_OPS = ("Identity", "Dropout", "Cast", "Neg")
GATES = ("Sigmoid", "HardSigmoid")


def is_activated(tensor: str, producers: dict) -> bool:
    """Is `tensor` the output of a nonlinear activation (possibly pooled, reshaped or concatenated after)?
    x * sigmoid(x) and x * hardsigmoid(x) count; BatchNorm, Add of a residual stream and linear layers do not."""
    node = producers.get(tensor)
    while node is not None and (node.op_type in MOVING or node.op_type in POOLS_KEEPING_MOMENTS) and node.input:
        node = producers.get(node.input[0])
    if node is None:
        return False
    if node.op_type in ACTIVATIONS:
        return node.op_type not in LINEAR_OPS
    return node.op_type == "Mul" and any(producers.get(i) is not None and producers[i].op_type in GATES
                                         for i in node.input)


def _calibration_feeds(calib, model) -> list[dict]:
    if isinstance(calib, (list, tuple)):
        return list(calib)
    from onnx_prune.runtime.fidelity import load_npz_inputs
    return load_npz_inputs(calib, model)


def measure_moments(model: onnx.ModelProto, analysis, tensors: list[str],
                    feeds: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-position (mean, var) along each tensor's channel layout over all feeds, accumulated as float64
    sums batch by batch (nothing but one batch's outputs is ever held)."""
    from onnx_prune.runtime.activations import probe_session

    return channel_moments(probe_session(model, tensors), tensors, feeds,
                           {t: analysis.layouts[t].axis for t in tensors})


def channel_moments(session, tensors: list[str], feeds: list[dict], axis_of: dict[str, int]
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor, (mean, var) of each position along its axis `axis_of[tensor]` over every other axis of every
    feed's output, accumulated as float64 sums batch by batch (nothing but one batch's outputs is ever held)."""
    sums, squares, counts = {}, {}, dict.fromkeys(tensors, 0)
    for feed in feeds:
        for tensor, array in zip(tensors, session.run(tensors, feed)):
            axis = axis_of[tensor]
            flat = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0).reshape(array.shape[axis], -1)
            sums[tensor] = sums.get(tensor, 0.0) + flat.sum(axis=1)
            squares[tensor] = squares.get(tensor, 0.0) + np.einsum("ij,ij->i", flat, flat)
            counts[tensor] += flat.shape[1]
    out = {}
    for tensor in tensors:
        n = max(counts[tensor], 1)
        mean = sums[tensor] / n
        out[tensor] = (mean, np.maximum(squares[tensor] / n - mean * mean, 0.0))
    return out


def _group_statistics(analysis, group, reads: dict[str, str], carried, from_bn, measured, kind,
                      producers) -> GroupStatistics:
    size = group.size
    per_read = {}
    for node, tensor in reads.items():
        lay = analysis.layouts[tensor]
        mine = np.nonzero(analysis.id_group[lay.ids] == group.id)[0]
        value = carried.get(tensor, Carried.unknown(len(lay.ids)))
        mean, var = value.moments()
        source = "bn"
        bn_value = from_bn.get(tensor)
        if bn_value is not value and (bn_value is None or not np.isfinite(bn_value.moments()[0][mine]).all()) \
                and np.isfinite(mean[mine]).all():
            source = "propagated"
        if kind == "unmeasured" and not np.isfinite(mean[mine]).all():
            source = kind
        if tensor in measured:
            m_mean, m_var = measured[tensor]
            replace = ~np.isfinite(value.const) & ((~np.isfinite(mean)) | (kind == "measured"))
            mean, var = np.where(replace, m_mean, mean), np.where(replace, m_var, var)
            if replace[mine].any():
                source = kind
        fixed = np.isfinite(value.const)
        if fixed[mine].all():
            source = "constant"
        channels = analysis.id_channel[lay.ids[mine]]
        count = np.bincount(channels, minlength=size).astype(np.float64)
        seen = count > 0
        c_mean = np.bincount(channels, mean[mine], size) / np.maximum(count, 1)
        # law of total variance over the positions a channel owns (Flatten blocks, tied grouped-conv inputs)
        c_square = np.bincount(channels, var[mine] + mean[mine] ** 2, size) / np.maximum(count, 1)
        c_var = np.maximum(c_square - c_mean ** 2, 0.0)
        c_fixed = np.bincount(channels, fixed[mine].astype(np.float64), size) == count
        c_var[c_fixed & seen & (c_var < 1e-12 * np.maximum(c_mean ** 2, 1.0))] = 0.0
        c_mean[~seen], c_var[~seen] = np.nan, np.nan
        per_read[node] = ReadStatistics(node, tensor, c_mean, c_var, c_fixed & seen & (c_var == 0), source,
                                        is_activated(tensor, producers))
    if not per_read:
        nan = np.full(size, np.nan)
        return GroupStatistics(group.id, nan, nan.copy(), np.zeros(size, dtype=bool), "none", {})
    stack_mean = np.array([r.mean for r in per_read.values()])
    stack_var = np.array([r.var for r in per_read.values()])
    with warnings.catch_warnings():  # channels no consumer reads: NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, var = np.nanmean(stack_mean, axis=0), np.nanmean(stack_var, axis=0)
    read_seen = np.isfinite(stack_mean)
    deterministic = np.array([r.deterministic for r in per_read.values()]).sum(axis=0) == read_seen.sum(axis=0)
    deterministic &= read_seen.any(axis=0)
    sources = {r.source for r in per_read.values()}
    source = next((s for s in ("measured", "synthetic", "propagated", "unmeasured", "bn") if s in sources),
                  "constant")
    return GroupStatistics(group.id, mean, var, deterministic, source, per_read)
