"""Least-squares repair with calibration data (METHODS.md §5.3), after any reduction (prune, merge).

Every Conv (2-D, group 1, any kernel, stride, padding, dilation), Gemm and MatMul whose input channels were
reduced is refitted: its weights (and bias) become the ridge least-squares solution that maps its input in
the REDUCED model to the ORIGINAL model's output of the same node, on calibration data.  The original output
is taken through the Plan's `merge` (a kept channel of a merged or pruned layer stands for
sum_c merge[c, k] * channel c, or just the kept one), so a layer whose own outputs shrank is fitted too.

- Order: layers are refitted in topological order and see the already repaired layers before them; layers
  that do not depend on each other form a "wave" fitted from one pass over the feeds, which runs the original
  (targets) and the reduced model (inputs), each truncated to what the wave reads (`sequential=False`: one
  wave, every layer fitted on the unrepaired reduced model).  Targets are not stored beyond their wave.
- Rows: k x k convs read im2col patches (a strided view of the padded input); about `rows` output positions
  per layer are sampled (seeded), spread evenly over the calibration feeds, which bounds time and memory.
- Feeds: consecutive feeds are concatenated into runs of up to `batch` samples where the model's inputs have a
  dynamic batch dim (`load_npz_inputs` gives one feed per sample; onnxruntime is faster on batches).
- Ridge: towards the current weights, lambda = `ridge` x the mean diagonal of X^T X (scale-free; the default
  1e-3 only tames directions the calibration data hardly visits); the bias is not penalised.
- Refusal: the feeds are split deterministically (every 1/`holdout`-th feed is held out); a layer keeps its
  old weights unless the refit lowers the relative error ||X W - Y|| / ||Y|| on the held-out feeds.

Requires: `original` is the model the Plan was built on (same node and tensor names; BatchNorm folded or not,
as it was), `reduced` is `ApplyPlanPass(analysis, plan)(original)`.  Ensures: the graph is unchanged except
weight values (and a bias input added to a Conv or Gemm that had none); the input model is not mutated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis, subgraph_reads
from onnx_prune.passes.base import PassResult, copy_model
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import position_map
from onnx_prune.runtime.sessions import input_specs

RIDGE = 1e-3
HOLDOUT = 0.25
ROWS = 8192
BATCH = 16


@dataclass
class LayerRepair:
    """One refitted layer; errors are relative, on the held-out feeds, before and after the refit."""
    node: str
    op: str
    features: int          # inputs per output (C_in * k * k, + 1 for a fitted bias)
    outputs: int
    rows_fit: int
    rows_held: int
    error_before: float
    error_after: float
    applied: bool          # False: the refit did not lower the held-out error, the old weights stay
    wave: int = 0


@dataclass
class RepairReport:
    layers: list[LayerRepair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # node -> why it was not refitted
    fit_feeds: int = 0
    held_feeds: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        """Fixed-width table, one row per refitted layer, then the skipped ones."""
        width = max([len("layer")] + [len(layer.node) for layer in self.layers])
        lines = [f"repair on {self.fit_feeds} fit / {self.held_feeds} held-out feed(s); held-out relative error",
                 f"{'layer':<{width}}  {'op':<6}  {'features':>8}  {'before':>8}  {'after':>8}  applied"]
        for layer in self.layers:
            lines.append(f"{layer.node:<{width}}  {layer.op:<6}  {layer.features:>8}  {layer.error_before:>8.4f}  "
                         f"{layer.error_after:>8.4f}  {'yes' if layer.applied else 'no (kept)'}")
        lines += [f"{node}: not refitted, {why}" for node, why in sorted(self.skipped.items())]
        return "\n".join(lines)


# --- the layers a reduction touched

@dataclass
class Layer:
    """A refittable layer: how to read its weights as theta (features x outputs) and write them back."""
    node: onnx.NodeProto
    wave: int = 0

    @property
    def op(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default):
        return next((helper.get_attribute_value(a) for a in self.node.attribute if a.name == name), default)

    @property
    def bias_name(self) -> str:
        return self.node.input[2] if len(self.node.input) > 2 else ""

    @property
    def fits_bias(self) -> bool:
        return self.op == "Conv" or (self.op == "Gemm" and self.attr("beta", 1.0) != 0)

    def theta(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        """Current effective weights, one column per output (+ a bias row where fitted)."""
        w = weights[self.node.input[1]].astype(np.float64)
        if self.op == "Conv":
            matrix = w.reshape(len(w), -1).T
        elif self.op == "Gemm":
            matrix = self.attr("alpha", 1.0) * (w.T if self.attr("transB", 0) else w)
        else:
            matrix = w
        if not self.fits_bias:
            return matrix
        bias = weights[self.bias_name].astype(np.float64).reshape(-1) if self.bias_name else \
            np.zeros(matrix.shape[1])
        scale = self.attr("beta", 1.0) if self.op == "Gemm" else 1.0
        return np.vstack([matrix, scale * np.broadcast_to(bias, (matrix.shape[1],))])

    def write(self, model: onnx.ModelProto, theta: np.ndarray) -> None:
        """Store theta back into the layer's initializers (a bias input is added where there was none)."""
        inits = {t.name: t for t in model.graph.initializer}
        node = next(n for n in model.graph.node if n.name == self.node.name)
        old = numpy_helper.to_array(inits[node.input[1]])
        matrix = theta[:-1] if self.fits_bias else theta
        if self.op == "Conv":
            new = matrix.T.reshape(old.shape)
        elif self.op == "Gemm":
            new = (matrix.T if self.attr("transB", 0) else matrix) / self.attr("alpha", 1.0)
        else:
            new = matrix
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new.astype(old.dtype), node.input[1]))
        if not self.fits_bias:
            return
        bias = theta[-1] / (self.attr("beta", 1.0) if self.op == "Gemm" else 1.0)
        if self.bias_name:
            shape = numpy_helper.to_array(inits[self.bias_name]).shape
            inits[self.bias_name].CopyFrom(numpy_helper.from_array(bias.reshape(shape).astype(old.dtype),
                                                                   self.bias_name))
        else:
            name = f"{node.name}.repair_bias"
            model.graph.initializer.append(numpy_helper.from_array(bias.astype(old.dtype), name))
            if len(node.input) > 2:  # an empty name stood for "no bias"
                node.input[2] = name
            else:
                node.input.append(name)


def _in_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 0
    return weight.ndim - 2


def _unfit(node: onnx.NodeProto, weights: dict, readers: dict[str, int]) -> str | None:
    """Why a layer with reduced inputs cannot be refitted here (None: it can)."""
    w = weights[node.input[1]]
    if any(readers.get(n, 0) > 1 for n in node.input[1:] if n):
        return "a weight is shared with another node"
    if node.op_type == "Conv":
        if w.ndim != 4 or next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
            return "only 2-D convs with group 1 are refitted"
    elif node.op_type == "Gemm":
        if next((a.i for a in node.attribute if a.name == "transA"), 0):
            return "Gemm with transA"
    elif w.ndim != 2:
        return "MatMul with a batched weight"
    bias = node.input[2] if len(node.input) > 2 else ""
    n_out = w.shape[0] if node.op_type == "Conv" else w.shape[1 - _in_axis(node, w)]
    if bias and (bias not in weights or weights[bias].size != n_out):
        return "bias is not a constant vector with one value per output"
    return None


def reduced_layers(original: onnx.ModelProto, reduced: onnx.ModelProto) -> tuple[list[Layer], dict[str, str]]:
    """Conv/Gemm/MatMul nodes of `reduced` whose constant weight reads fewer input channels than in
    `original`, in graph order; and the ones that cannot be refitted, with why."""
    before = {t.name: tuple(t.dims) for t in original.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in reduced.graph.initializer}
    original_nodes = {n.name: n for n in original.graph.node}
    readers: dict[str, int] = {}
    for node in reduced.graph.node:
        for name in set(node.input) | subgraph_reads(node):
            readers[name] = readers.get(name, 0) + 1
    layers, skipped = [], {}
    for node in reduced.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in weights \
                or node.input[0] in weights:
            continue
        w = weights[node.input[1]]
        axis = _in_axis(node, w)
        old = before.get(node.input[1])
        if old is None or len(old) != w.ndim or w.shape[axis] >= old[axis]:
            continue
        twin = original_nodes.get(node.name)
        out_axis = 0 if node.op_type == "Conv" else w.ndim - 1 - axis
        other_dims = [d for i, d in enumerate(w.shape) if i not in (axis, out_axis)]
        if twin is None or twin.op_type != node.op_type or list(twin.input[:2]) != list(node.input[:2]) \
                or list(twin.output) != list(node.output) or w.shape[out_axis] > old[out_axis] \
                or other_dims != [d for i, d in enumerate(old) if i not in (axis, out_axis)]:
            raise ValueError(f"node '{node.name}' differs between the original and the reduced model: "
                             "repair needs the model the plan was applied to")
        why = _unfit(node, weights, readers)
        if why:
            skipped[node.name] = why
        else:
            layers.append(Layer(node))
    return layers, skipped


def assign_waves(model: onnx.ModelProto, layers: list[Layer]) -> None:
    """wave = 1 + the largest wave among the layers upstream (0 when none): a wave's layers are independent."""
    by_name = {layer.node.name: layer for layer in layers}
    level: dict[str, int] = {}  # tensor -> 1 + highest wave of a layer upstream
    for node in model.graph.node:
        reach = max([level.get(n, 0) for n in set(node.input) | subgraph_reads(node)], default=0)
        layer = by_name.get(node.name)
        if layer is not None:
            layer.wave = reach
            reach = reach + 1
        for out in node.output:
            level[out] = reach


# --- rows: im2col patches and targets at sampled positions

def conv_pads(layer: Layer, in_hw: tuple[int, int], out_hw: tuple[int, int], kernel: tuple[int, int]) -> list[int]:
    """[top, left, bottom, right] padding, from `pads` or `auto_pad`."""
    auto = layer.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(layer.attr("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    strides, dilations = layer.attr("strides", [1, 1]), layer.attr("dilations", [1, 1])
    begin, end = [], []
    for i in range(2):
        total = max((out_hw[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_hw[i], 0)
        small = total // 2
        begin.append(total - small if auto == "SAME_LOWER" else small)
        end.append(total - begin[-1])
    return begin + end


def im2col(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations, out_hw) -> np.ndarray:
    """A view (N, C, H_out, W_out, kh, kw) of every receptive field of x (N, C, H, W), without copying."""
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(kernel[i] - 1) * dilations[i] + 1 for i in range(2)]
    windows = sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    return windows[:, :, :out_hw[0], :out_hw[1]]


def layer_rows(layer: Layer, x: np.ndarray, out_shape: tuple[int, ...], kernel: tuple[int, ...],
               rows: np.ndarray) -> np.ndarray:
    """Input features of the layer at output rows `rows` (flat indices over the output's non-channel dims)."""
    if layer.op == "Conv":
        n, oy, ox = np.unravel_index(rows, (out_shape[0],) + tuple(out_shape[2:]))
        windows = im2col(x, kernel, layer.attr("strides", [1, 1]),
                         conv_pads(layer, x.shape[2:], out_shape[2:], kernel), layer.attr("dilations", [1, 1]),
                         out_shape[2:])
        features = windows[n, :, oy, ox].reshape(len(rows), -1)
    else:
        features = x.reshape(-1, x.shape[-1])[rows]
    features = features.astype(np.float64)
    return np.hstack([features, np.ones((len(rows), 1))]) if layer.fits_bias else features


def output_rows(y: np.ndarray, channel_axis: int, rows: np.ndarray) -> np.ndarray:
    """(rows, channels) of an output tensor at flat indices `rows` over its non-channel dims (no full copy)."""
    index = list(np.unravel_index(rows, y.shape[:channel_axis] + y.shape[channel_axis + 1:]))
    index.insert(channel_axis, slice(None))
    return y[tuple(index)]


def output_axis(layer: Layer, ndim: int) -> int:
    return 1 if layer.op in ("Conv", "Gemm") else ndim - 1


def split_feeds(count: int, holdout: float = HOLDOUT) -> tuple[list[int], list[int]]:
    """(fit, held-out) feed indices: every round(1/holdout)-th feed is held out (the last one at least)."""
    if count < 2:
        raise ValueError("repair needs at least 2 calibration feeds (one to fit, one to check)")
    every = max(2, int(round(1.0 / holdout)))
    held = [i for i in range(count) if i % every == every - 1] or [count - 1]
    return [i for i in range(count) if i not in held], held


# --- the fit

@dataclass
class NormalEquations:
    """X^T X and X^T Y accumulated over fit rows."""
    gram: np.ndarray
    cross: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, features: int, outputs: int) -> "NormalEquations":
        return cls(np.zeros((features, features)), np.zeros((features, outputs)))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.rows += len(x)


def ridge_fit(equations: NormalEquations, theta0: np.ndarray, ridge: float = RIDGE,
              free_rows: int = 0) -> np.ndarray:
    """argmin ||X theta - Y||^2 + lambda ||theta - theta0||^2 over all but the last `free_rows` rows of theta
    (the bias), lambda = ridge x the mean diagonal of X^T X over the penalised features."""
    n = len(theta0)
    penalty = np.ones(n)
    penalty[n - free_rows:] = 0.0
    diagonal = np.diag(equations.gram)[penalty > 0]
    lam = ridge * float(diagonal.mean()) if diagonal.size else 0.0
    lhs = equations.gram + np.diag(lam * penalty)
    rhs = equations.cross + (lam * penalty)[:, None] * theta0
    try:
        return scipy.linalg.solve(lhs, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(lhs, rhs)[0]


def relative_error(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    norm = float(np.linalg.norm(y))
    error = float(np.linalg.norm(x @ theta - y))
    return error / norm if norm > 0 else error


def batch_feeds(feeds: list[dict], model: onnx.ModelProto, batch: int = BATCH) -> list[dict]:
    """Consecutive feeds concatenated along axis 0 into runs of up to `batch` samples (fewer where that keeps
    at least 8 runs, so that some can be held out), when every model input has a dynamic leading dim."""
    specs = input_specs(model)
    if not feeds or any(not spec.dims or isinstance(spec.dims[0], int) for spec in specs):
        return feeds
    names = [spec.name for spec in specs]
    total = sum(len(feed[names[0]]) for feed in feeds)
    per_run = max(1, min(batch, total // 8))
    runs, pending = [], []
    for feed in feeds:
        pending.append(feed)
        if sum(len(f[names[0]]) for f in pending) >= per_run:
            runs.append({n: np.concatenate([f[n] for f in pending]) for n in names})
            pending = []
    if pending:
        runs.append({n: np.concatenate([f[n] for f in pending]) for n in names})
    return runs


def upstream_graph(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` computing only `tensors` (its outputs): the nodes they depend on, nothing after."""
    needed, nodes = set(tensors), []
    for node in reversed(model.graph.node):
        if needed & set(node.output):
            nodes.append(node)
            needed |= set(node.input) | subgraph_reads(node)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.node[:], probe.graph.output[:]
    probe.graph.node.extend(reversed(nodes))
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    kept = [t for t in probe.graph.initializer if t.name in needed]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    return probe


def intermediate_tensors(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]):
    """Yield, per feed, the named intermediate tensors (a session that computes nothing else)."""
    probe = upstream_graph(model, tensors)
    options = ort.SessionOptions()
    # numpy works between runs: onnxruntime's threads must not spin-wait for the next run meanwhile
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield dict(zip(tensors, session.run(tensors, {k: v for k, v in feed.items() if k in inputs})))


class LeastSquaresRepairPass:
    """`LeastSquaresRepairPass(original, analysis, plan, inputs, ...)(reduced) -> PassResult`; `.report` after."""

    def __init__(self, original: onnx.ModelProto, analysis: ChannelAnalysis, plan: Plan, inputs: list[dict],
                 ridge: float = RIDGE, holdout: float = HOLDOUT, rows: int = ROWS, batch: int = BATCH, seed: int = 0,
                 sequential: bool = True):
        self.original, self.analysis, self.plan = original, analysis, plan
        self.inputs = batch_feeds(inputs, original, batch)
        self.positions = -(-rows // len(self.inputs)) if self.inputs else rows  # per feed
        self.ridge, self.holdout, self.seed, self.sequential = ridge, holdout, seed, sequential
        self.report = RepairReport()
        self._maps: dict[str, np.ndarray] = {}  # layer -> how the reduced output channels read the original ones

    def __call__(self, reduced: onnx.ModelProto) -> PassResult:
        model = copy_model(reduced)
        layers, skipped = reduced_layers(self.original, model)
        fit_ids, held_ids = split_feeds(len(self.inputs), self.holdout)
        self.report = RepairReport([], skipped, len(fit_ids), len(held_ids))
        if not layers:
            return PassResult(model, False)
        if self.sequential:
            assign_waves(model, layers)
        for wave in sorted({layer.wave for layer in layers}):
            self._fit_wave(model, [layer for layer in layers if layer.wave == wave], layers, held_ids)
        return PassResult(model, any(r.applied for r in self.report.layers))

    def _targets(self, wave: list[Layer], outputs: dict[str, np.ndarray], index: dict[str, int], feed: int):
        """Per layer of the wave: sampled output rows (seeded by layer and feed), the output's shape, and the
        original's output at those rows mapped onto the reduced channels (through the Plan's merge)."""
        found = []
        for layer in wave:
            name = layer.node.output[0]
            y = outputs[name]
            layout = self.analysis.layouts.get(name)
            axis = output_axis(layer, y.ndim) if layout is None else layout.axis
            count = y.size // y.shape[axis]
            rng = np.random.default_rng([self.seed, index[layer.node.name], feed])
            rows = np.sort(rng.choice(count, self.positions, replace=False)) if count > self.positions \
                else np.arange(count)
            target = output_rows(y, axis, rows).astype(np.float64)
            if layout is not None:
                if layer.node.name not in self._maps:
                    self._maps[layer.node.name] = position_map(self.analysis, self.plan, layout.ids)
                target = target @ self._maps[layer.node.name]
            found.append((rows, y.shape, target))
        return found

    def _fit_wave(self, model: onnx.ModelProto, wave: list[Layer], layers: list[Layer], held_ids: list[int]) -> None:
        """Refit the layers of one wave: the original model gives the targets, the (partly repaired) reduced
        model the inputs, both run feed by feed."""
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        thetas = [layer.theta(weights) for layer in wave]
        kernels = [tuple(weights[layer.node.input[1]].shape[2:]) for layer in wave]
        equations = [NormalEquations.empty(*theta.shape) for theta in thetas]
        held_x: list[list[np.ndarray]] = [[] for _ in wave]
        held_y: list[list[np.ndarray]] = [[] for _ in wave]
        index = {layer.node.name: i for i, layer in enumerate(layers)}
        originals = intermediate_tensors(self.original, sorted({layer.node.output[0] for layer in wave}), self.inputs)
        reduced = intermediate_tensors(model, sorted({layer.node.input[0] for layer in wave}), self.inputs)
        for f, (outputs, values) in enumerate(zip(originals, reduced)):
            for i, (rows, out_shape, y) in enumerate(self._targets(wave, outputs, index, f)):
                x = layer_rows(wave[i], values[wave[i].node.input[0]], out_shape, kernels[i], rows)
                if f in held_ids:
                    held_x[i].append(x)
                    held_y[i].append(y)
                else:
                    equations[i].add(x, y)
        for i, layer in enumerate(wave):
            x, y = np.vstack(held_x[i]), np.vstack(held_y[i])
            theta = ridge_fit(equations[i], thetas[i], self.ridge, int(layer.fits_bias))
            before, after = relative_error(x, y, thetas[i]), relative_error(x, y, theta)
            applied = bool(after < before)
            if applied:
                layer.write(model, theta)
            self.report.layers.append(LayerRepair(layer.node.name, layer.op, thetas[i].shape[0],
                                                  thetas[i].shape[1], equations[i].rows, len(x), before, after,
                                                  applied, layer.wave))


def repair(original: onnx.ModelProto, reduced: onnx.ModelProto, inputs: list[dict], analysis: ChannelAnalysis,
           plan: Plan, **options) -> tuple[onnx.ModelProto, RepairReport]:
    """`reduced` with its reduced layers refitted on `inputs` (feed dicts); options as LeastSquaresRepairPass."""
    repair_pass = LeastSquaresRepairPass(original, analysis, plan, inputs, **options)
    return repair_pass(reduced).model, repair_pass.report
