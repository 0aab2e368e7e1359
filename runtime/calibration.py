"""Streaming second-order statistics of calibration activations, per layer that reads them.

For a consumer layer (Conv with group 1 and any kernel: im2col rows; depthwise Conv: one k x k block per
channel; Gemm / MatMul: rows of its input) the input features X (one row per sampled output position, a column
of ones appended where the layer has a bias) are accumulated batch by batch into moments, split into folds:

    G_f = X_f^T X_f,   C_f = X_f^T Y_f,   yy_f = sum of Y_f^2 per output,   n_f rows

so that memory is bounded by the largest Gram matrix (times the fold count), never by the data set.  Folds
follow the *source* of each sample (the photo a crop came from, when the caller knows it), so that a held-out
fold never shares a source with the fitted ones; without sources, samples are split into contiguous blocks
(crops of one photo are usually stored next to each other).  Y (targets, e.g. the original model's output of
the same layer) is optional: without it only Grams are kept.

The effective sample count of a layer says how many independent rows its moments are worth: per feature, the
variance of the rows over the (cluster-robust) variance of their mean, grouping rows by source; the median over
features, between 1 and the row count.  Rows taken from one image are strongly correlated, so it is far below
the row count when a few images give many rows.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from onnx_prune.analysis.channels import subgraph_reads
from onnx_prune.analysis.layers import attr, weight_axes

FOLDS = 4
POSITIONS = 64    # output positions sampled per sample and layer (all of them where there are fewer)
PROBES = 64       # features whose per-source sums are kept for the effective sample count


def source_folds(sources: np.ndarray | None, count: int, folds: int = FOLDS) -> np.ndarray:
    """Fold index (0..folds-1) per sample.  With `sources`, every sample of one source lands in one fold
    (distinct sources dealt round-robin in order of first appearance); without, contiguous blocks."""
    if sources is None:
        return (np.arange(count) * folds // max(count, 1)).astype(np.int64)
    sources = np.asarray(sources)
    if len(sources) != count:
        raise ValueError(f"{len(sources)} source ids for {count} calibration samples")
    _, first, inverse = np.unique(sources, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # distinct sources numbered by first appearance
    return (rank[inverse] % folds).astype(np.int64)


def source_index(sources: np.ndarray | None, count: int) -> tuple[np.ndarray, int]:
    """Dense source number per sample (each sample its own source when none are given) and their count."""
    if sources is None:
        return np.arange(count), count
    _, inverse = np.unique(np.asarray(sources), return_inverse=True)
    return inverse.astype(np.int64), int(inverse.max()) + 1 if len(inverse) else 0


@dataclass
class FoldMoments:
    """Moments of (X, Y) per fold; `features` columns (the last one all ones where `bias`)."""
    gram: np.ndarray                 # (folds, F, F)
    cross: np.ndarray | None         # (folds, F, O), None without targets
    yy: np.ndarray | None            # (folds, O)
    rows: np.ndarray                 # (folds,)
    source_sums: np.ndarray          # (sources, probes): sum of each probed feature over a source's rows
    source_rows: np.ndarray          # (sources,)
    bias: bool = False
    probes: np.ndarray | None = None  # the feature columns whose per-source sums are kept (for n_eff)

    @classmethod
    def empty(cls, features: int, outputs: int | None, folds: int, sources: int, bias: bool) -> "FoldMoments":
        probes = np.unique(np.linspace(0, max(features - int(bias) - 1, 0), min(PROBES, features)).astype(np.int64))
        return cls(np.zeros((folds, features, features)),
                   None if outputs is None else np.zeros((folds, features, outputs)),
                   None if outputs is None else np.zeros((folds, outputs)),
                   np.zeros(folds, dtype=np.int64), np.zeros((sources, len(probes))),
                   np.zeros(sources, dtype=np.int64), bias, probes)

    @property
    def folds(self) -> int:
        return len(self.rows)

    def add(self, x: np.ndarray, y: np.ndarray | None, fold: np.ndarray, source: np.ndarray) -> None:
        """Rows x (R, F) with targets y (R, O), each row's fold and source."""
        for f in np.unique(fold):
            rows = fold == f
            xf = x[rows]
            self.gram[f] += xf.T @ xf
            if self.cross is not None:
                self.cross[f] += xf.T @ y[rows]
                self.yy[f] += np.einsum("ij,ij->j", y[rows], y[rows])
            self.rows[f] += int(rows.sum())
        order = np.argsort(source, kind="stable")
        ids, starts = np.unique(source[order], return_index=True)
        self.source_sums[ids] += np.add.reduceat(x[order][:, self.probes], starts, axis=0)
        self.source_rows[ids] += np.diff(np.append(starts, len(source)))

    def total(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
        """(G, C, yy, n) over all folds."""
        cross = None if self.cross is None else self.cross.sum(0)
        yy = None if self.yy is None else self.yy.sum(0)
        return self.gram.sum(0), cross, yy, int(self.rows.sum())

    def effective_samples(self) -> float:
        """Median over probed features of var(rows) / (n * var(mean) clustered by source): independent rows."""
        gram, _, _, n = self.total()
        used = self.source_rows > 0
        if n < 2 or used.sum() < 2:
            return float(n)
        live_probes = self.probes < gram.shape[0] - int(self.bias)
        probes = self.probes[live_probes]
        sums = self.source_sums[used][:, live_probes]
        mean = sums.sum(0) / n
        variance = np.diag(gram)[probes] / n - mean ** 2
        deviation = sums - self.source_rows[used, None] * mean
        mean_variance = (deviation ** 2).sum(0) / n ** 2
        live = (variance > 1e-12 * max(float(variance.max(initial=0.0)), 1e-30)) & (mean_variance > 0)
        if not live.any():
            return float(n)
        return float(np.clip(np.median(variance[live] / mean_variance[live]), 1.0, n))


@dataclass
class Progress:
    """One line per layer on stderr (nothing when quiet)."""
    quiet: bool = False
    label: str = "calibration"
    lines: list[str] = field(default_factory=list)

    def layer(self, index: int, count: int, name: str, moments: FoldMoments) -> None:
        line = (f"{self.label}: layer {index + 1}/{count} {name}: {moments.gram.shape[1]} features, "
                f"{int(moments.rows.sum())} rows, {int((moments.source_rows > 0).sum())} sources, "
                f"~{moments.effective_samples():.0f} effective samples")
        self.lines.append(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def sample_positions(count: int, positions: int, seed: tuple) -> np.ndarray:
    """`positions` distinct indices in [0, count), sorted, seeded (all of them when count is smaller)."""
    if count <= positions:
        return np.arange(count)
    return np.sort(np.random.default_rng(list(seed)).choice(count, positions, replace=False))


def accumulate(batches, features: int, outputs: int | None, folds: int, sources: int, bias: bool) -> FoldMoments:
    """Moments from an iterable of (x rows, y rows or None, fold per row, source per row)."""
    moments = FoldMoments.empty(features, outputs, folds, sources, bias)
    for x, y, fold, source in batches:
        moments.add(np.asarray(x, dtype=np.float64), None if y is None else np.asarray(y, dtype=np.float64),
                    np.asarray(fold), np.asarray(source))
    return moments


# --- a layer read as features x outputs

@dataclass
class Layer:
    """A refittable layer: how to read its weights as theta (features x outputs) and write them back."""
    node: onnx.NodeProto
    wave: int = 0

    @property
    def op(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default):
        return attr(self.node, name, default)

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
        else:  # Gemm, MatMul (alpha 1): (inputs, outputs)
            matrix = self.attr("alpha", 1.0) * np.moveaxis(w, weight_axes(self.node, w.ndim)[1], 0)
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
        else:  # Gemm, MatMul (alpha 1): back from (inputs, outputs) to the stored orientation
            new = np.moveaxis(matrix, 0, weight_axes(node, old.ndim)[1]) / self.attr("alpha", 1.0)
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
    return weight_axes(node, weight.ndim)[1]


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




# --- the streaming driver

def sample_count(feed: dict) -> int:
    return len(next(iter(feed.values())))


def feed_batches(feeds: list[dict], batch: int, dynamic: bool) -> list[tuple[dict, np.ndarray]]:
    """(feed, global sample index per row of its leading axis): consecutive feeds concatenated into runs of up
    to `batch` samples where the model's batch dim is dynamic."""
    out, pending, start = [], [], 0

    def flush():
        nonlocal pending, start
        if pending:
            count = sum(sample_count(f) for f in pending)
            joined = pending[0] if len(pending) == 1 else {k: np.concatenate([f[k] for f in pending])
                                                            for k in pending[0]}
            out.append((joined, np.arange(start, start + count)))
            start, pending = start + count, []
    for feed in feeds:
        pending.append(feed)
        if not dynamic or sum(sample_count(f) for f in pending) >= batch:
            flush()
    flush()
    return out


def layer_sample_rows(layer: Layer, out_shape: tuple[int, ...], samples: np.ndarray, positions: int, seed: int,
                      index: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat output rows sampled for each sample of a batch (seeded by layer and global sample, so the same
    rows are drawn in every pass over the data), and the batch-local sample of each row."""
    axis = output_axis(layer, len(out_shape))
    per_sample = int(np.prod(out_shape)) // out_shape[axis] // len(samples)
    rows, owner = [], []
    for n, sample in enumerate(samples.tolist()):
        chosen = sample_positions(per_sample, positions, (seed, index, sample))
        rows.append(n * per_sample + chosen)
        owner.append(np.full(len(chosen), n))
    return np.concatenate(rows), np.concatenate(owner)


def collect_moments(model: onnx.ModelProto, layers: list[Layer], batches: list[tuple[dict, np.ndarray]],
                    fold_of: np.ndarray, source_of: np.ndarray, sources: int, target: onnx.ModelProto | None = None,
                    folds: int = FOLDS, positions: int = POSITIONS, seed: int = 0, progress: Progress | None = None,
                    indices: list[int] | None = None, target_maps: list | None = None) -> list[FoldMoments]:
    """Per layer (a node of `model`), the moments of its input features in `model` against its output in
    `target` (the same node name there; None: Grams only), streamed over `batches` (see `feed_batches`).
    `fold_of` / `source_of`: per global sample.  `indices`: a stable number per layer for the row seeds.
    `target_maps`: per layer None or a matrix the target's channels are multiplied by (original -> reduced)."""
    indices = list(range(len(layers))) if indices is None else indices
    inputs = sorted({layer.node.input[0] for layer in layers})
    outputs = sorted({layer.node.output[0] for layer in layers})
    feeds = [feed for feed, _ in batches]
    reader = intermediate_tensors(model, inputs if target is not None else sorted(set(inputs) | set(outputs)), feeds)
    targets = intermediate_tensors(target, outputs, feeds) if target is not None else None
    weights = {t.name: t for t in model.graph.initializer}
    kernels = [tuple(weights[layer.node.input[1]].dims[2:]) for layer in layers]
    moments: list[FoldMoments | None] = [None] * len(layers)
    for (_, samples), values in zip(batches, reader):
        found = next(targets) if targets is not None else values
        for i, layer in enumerate(layers):
            y = found[layer.node.output[0]]
            rows, owner = layer_sample_rows(layer, y.shape, samples, positions, seed, indices[i])
            x = layer_rows(layer, values[layer.node.input[0]], y.shape, kernels[i], rows)
            y_rows = None
            if target is not None:
                y_rows = output_rows(y, output_axis(layer, y.ndim), rows).astype(np.float64)
                if target_maps is not None and target_maps[i] is not None:
                    y_rows = y_rows @ target_maps[i]
            if moments[i] is None:
                moments[i] = FoldMoments.empty(x.shape[1], None if y_rows is None else y_rows.shape[1], folds,
                                               sources, layer.fits_bias)
            moments[i].add(x, y_rows, fold_of[samples[owner]], source_of[samples[owner]])
    if progress is not None:
        for i, layer in enumerate(layers):
            progress.layer(i, len(layers), layer.node.name, moments[i])
    return moments
