"""Least-squares repair with calibration data (METHODS.md §5.3, §6), after any reduction (prune, merge).

Every Conv (2-D, group 1, any kernel, stride, padding, dilation), Gemm and MatMul whose input channels were
reduced is refitted: its weights (and bias) become the ridge solution, shrunk toward its current weights, that
maps its input in the REDUCED model to the ORIGINAL model's output of the same node, on calibration data.  The
original output is taken through the Plan's `merge` (a kept channel of a merged or pruned layer stands for
sum_c merge[c, k] * channel c, or just the kept one), so a layer whose own outputs shrank is fitted too.

- Order: layers are refitted in topological order and see the already repaired layers before them; layers
  that do not depend on each other form a "wave" fitted from one pass over the feeds, which runs the original
  (targets) and the reduced model (inputs), each truncated to what the wave reads (`sequential=False`: one
  wave, every layer fitted on the unrepaired reduced model).  Only moments are kept (`runtime.calibration`).
- Rows: k x k convs read im2col patches; about `rows` output positions per layer are sampled (seeded per
  sample), spread evenly over the calibration samples, which bounds time and memory.
- Honest hold-out: samples are split into folds by SOURCE (`sources`: the photo each sample was cut from; without
  it, contiguous blocks, as crops of one photo are usually stored together), never interleaved: crops of one
  photo on both sides made the old every-4th-feed check blind to overfitting (0.81 top-1 agreement measured on
  the calibration photos, 0.05 on others).
- Ridge: chosen per layer by cross-validation over those folds from the grid `obs.RIDGE_GRID` (amounts at least
  `ridge`, relative to the mean diagonal of X^T X), including infinity: the weights stay and only the bias is
  refitted (compensation by measured means).  The bias is never penalised.
- Refusal: a layer keeps its old weights unless the chosen fit lowers the cross-validated relative error.

Requires: `original` is the model the Plan was built on (same node and tensor names; BatchNorm folded or not,
as it was), `reduced` is `ApplyPlanPass(analysis, plan)(original)`.  Ensures: the graph is unchanged except
weight values (and a bias input added to a Conv or Gemm that had none); the input model is not mutated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_prune.analysis.channels import ChannelAnalysis, subgraph_reads
from onnx_prune.analysis.layers import attr, weight_axes
from onnx_prune.passes.base import Pass, PassResult, copy_model
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import position_map
from onnx_prune.passes.obs import choose_ridge, fit_grid, squared_error  # noqa: F401 (fit_grid re-exported)
from onnx_prune.runtime.calibration import (FOLDS, FoldMoments, Layer, Progress,  # noqa: F401
                                            collect_moments, conv_pads, feed_batches, im2col, intermediate_tensors,
                                            layer_rows, output_axis, output_rows, source_folds, source_index,
                                            upstream_graph)
from onnx_prune.runtime.sessions import input_specs

RIDGE = 1e-3
ROWS = 8192
BATCH = 16


@dataclass
class LayerRepair:
    """One refitted layer; errors are relative (||X W - Y|| / ||Y||), cross-validated over source folds: of the
    weights before, of the chosen fit, and of compensation only (weights kept, bias refitted)."""
    node: str
    op: str
    features: int          # inputs per output (C_in * k * k, + 1 for a fitted bias)
    outputs: int
    rows: int
    effective_samples: float
    error_before: float
    error_after: float
    error_compensation: float
    ridge: float           # chosen amount relative to the mean diagonal of X^T X; inf: bias refitted only
    applied: bool          # False: the fit did not lower the held-out error, the old weights stay
    wave: int = 0


@dataclass
class RepairReport:
    layers: list[LayerRepair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # node -> why it was not refitted
    samples: int = 0
    folds: int = 0
    split: str = ""        # how the folds were made: by source, or contiguous blocks
    sources: int = 0       # distinct sources the folds were dealt from (0: none given)

    def to_dict(self) -> dict:
        return asdict(self)


def format_table(details: dict) -> str:
    """The repair's details (`RepairReport.to_dict()`) as a fixed-width table, one row per refitted layer, then
    the skipped ones."""
    layers = details["layers"]
    width = max([len("layer")] + [len(layer["node"]) for layer in layers])
    of = f", {details['sources']} sources" if details.get("sources") else ""
    lines = [f"repair on {details['samples']} sample(s), {details['folds']} folds ({details['split']}{of}); "
             "cross-validated relative error",
             f"{'layer':<{width}}  {'op':<6}  {'features':>8}  {'eff.n':>7}  {'before':>8}  {'after':>8}  "
             f"{'comp.':>8}  {'ridge':>7}  applied"]
    for layer in layers:
        lines.append(f"{layer['node']:<{width}}  {layer['op']:<6}  {layer['features']:>8}  "
                     f"{layer['effective_samples']:>7.0f}  {layer['error_before']:>8.4f}  "
                     f"{layer['error_after']:>8.4f}  {layer['error_compensation']:>8.4f}  {layer['ridge']:>7.0e}  "
                     f"{'yes' if layer['applied'] else 'no (kept)'}")
    lines += [f"{node}: not refitted, {why}" for node, why in sorted(details["skipped"].items())]
    return "\n".join(lines)


def _unfit(node: onnx.NodeProto, weights: dict, readers: dict[str, int]) -> str | None:
    """Why a layer with reduced inputs cannot be refitted here (None: it can)."""
    w = weights[node.input[1]]
    if any(readers.get(n, 0) > 1 for n in node.input[1:] if n):
        return "a weight is shared with another node"
    if node.op_type == "Conv":
        if w.ndim != 4 or attr(node, "group", 1) != 1:
            return "only 2-D convs with group 1 are refitted"
    elif node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA"
    elif w.ndim != 2:
        return "MatMul with a batched weight"
    bias = node.input[2] if len(node.input) > 2 else ""
    n_out = w.shape[weight_axes(node, w.ndim)[0]]
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
        out_axis, axis = weight_axes(node, w.ndim)
        old = before.get(node.input[1])
        if old is None or len(old) != w.ndim or w.shape[axis] >= old[axis]:
            continue
        twin = original_nodes.get(node.name)
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


def dynamic_batch(model: onnx.ModelProto) -> bool:
    specs = input_specs(model)
    return bool(specs) and all(spec.dims and not isinstance(spec.dims[0], int) for spec in specs)


def cv_error(moments: FoldMoments, theta: np.ndarray) -> float:
    """Squared error of fixed weights on every fold over the folds' target energy (each fold is held out from a
    fit that does not involve it: the weights are not fitted)."""
    energy = float(moments.yy.sum()) or 1.0
    return sum(squared_error(moments.gram[f], moments.cross[f], moments.yy[f], theta)
               for f in range(moments.folds) if moments.rows[f]) / energy


class LeastSquaresRepairPass(Pass):
    """`LeastSquaresRepairPass(original, analysis, plan, inputs, ...)(reduced) -> PassResult` whose `details` is
    the `RepairReport` as plain data (per refitted layer its errors, ridge and whether it was applied; the
    layers skipped, with why).

    `sources`: per calibration sample, the id of what it was cut from (a photo), for honest folds."""

    def __init__(self, original: onnx.ModelProto, analysis: ChannelAnalysis, plan: Plan, inputs: list[dict],
                 ridge: float = RIDGE, rows: int = ROWS, batch: int = BATCH, seed: int = 0,
                 sequential: bool = True, sources=None, folds: int = FOLDS, quiet: bool = True):
        self.original, self.analysis, self.plan = original, analysis, plan
        self.batches = feed_batches(inputs, batch, dynamic_batch(original))
        self.samples = int(self.batches[-1][1][-1]) + 1 if self.batches else 0
        if self.samples < 2:
            raise ValueError("repair needs at least 2 calibration samples (to fit and to check on others)")
        self.folds = min(folds, self.samples)
        self.fold_of = source_folds(sources, self.samples, self.folds)
        self.source_of, self.sources = source_index(sources, self.samples)
        if len(np.unique(self.fold_of)) < 2:
            raise ValueError("repair needs calibration samples from at least 2 sources (to fit and to check)")
        self.split = "by source" if sources is not None else "contiguous blocks of samples"
        self.positions = max(1, -(-rows // self.samples))
        self.grid = fit_grid(ridge)
        self.seed, self.sequential = seed, sequential
        self.progress = Progress(quiet=quiet, label="repair")

    def call(self, reduced: onnx.ModelProto) -> PassResult:
        model = copy_model(reduced)
        layers, skipped = reduced_layers(self.original, model)
        report = RepairReport([], skipped, self.samples, self.folds, self.split,
                              self.sources if self.split == "by source" else 0)
        if layers and self.sequential:
            assign_waves(model, layers)
        index = {layer.node.name: i for i, layer in enumerate(layers)}
        for wave in sorted({layer.wave for layer in layers}):
            report.layers += self._fit_wave(model, [layer for layer in layers if layer.wave == wave], index)
        return PassResult(model, any(r.applied for r in report.layers), report.to_dict())

    def _target_map(self, layer: Layer) -> np.ndarray | None:
        """How the reduced layer's output channels read the original ones (None: the same channels)."""
        layout = self.analysis.layouts.get(layer.node.output[0])
        return None if layout is None else position_map(self.analysis, self.plan, layout.ids)

    def _fit_wave(self, model: onnx.ModelProto, wave: list[Layer], index: dict[str, int]) -> list[LayerRepair]:
        """Refit the layers of one wave: the original model gives the targets, the (partly repaired) reduced
        model the inputs, both streamed batch by batch into moments.  One row per layer, applied or not."""
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        moments = collect_moments(model, wave, self.batches, self.fold_of, self.source_of, self.sources,
                                  target=self.original, folds=self.folds, positions=self.positions, seed=self.seed,
                                  progress=self.progress, indices=[index[l.node.name] for l in wave],
                                  target_maps=[self._target_map(layer) for layer in wave])
        rows = []
        for layer, found in zip(wave, moments):
            theta0 = layer.theta(weights)
            choice = choose_ridge(found, theta0, self.grid)
            before, after = cv_error(found, theta0), choice.cv_error
            applied = bool(after < before)
            if applied:
                layer.write(model, choice.theta)
            rows.append(LayerRepair(
                layer.node.name, layer.op, theta0.shape[0], theta0.shape[1], int(found.rows.sum()),
                found.effective_samples(), float(np.sqrt(before)), float(np.sqrt(after)),
                float(np.sqrt(choice.cv_compensation)), choice.relative, applied, layer.wave))
        return rows


def repair(original: onnx.ModelProto, reduced: onnx.ModelProto, inputs: list[dict], analysis: ChannelAnalysis,
           plan: Plan, **options) -> tuple[onnx.ModelProto, dict]:
    """`reduced` with its reduced layers refitted on `inputs` (feed dicts), and the pass's details (the
    `RepairReport` as plain data); options as LeastSquaresRepairPass."""
    result = LeastSquaresRepairPass(original, analysis, plan, inputs, **options)(reduced)
    return result.model, result.details
