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
import scipy.linalg
from onnx import numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis, subgraph_reads
from onnx_prune.passes.base import PassResult, copy_model
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import position_map
from onnx_prune.runtime.calibration import (Layer, _in_axis, conv_pads, im2col, intermediate_tensors,  # noqa: F401
                                            layer_rows, output_axis, output_rows, upstream_graph)
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
