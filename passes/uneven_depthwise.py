"""Uneven depthwise separation (RED, METHODS.md §2.3): a k x k conv whose kernels repeat becomes a depthwise
conv followed by a 1 x 1 conv.

For a Conv with group 1 and weight W (n_out, n_in, k...), input channel c carries u_c distinct non-zero
kernels W[o, c] across the output filters (after hashing, often few).  The conv is rewritten as

    Gather(x, channel of each kernel, axis=1)  ->  Conv(S distinct kernels, group=S)  ->  Conv 1x1 (coefficients, bias)

with S = sum(u_c): channel c is replicated u_c times (uneven multiplicity) and the 1 x 1 conv holds a 1 where
filter o uses kernel j of channel c.  The Gather is left out where every channel has exactly one kernel.
A Gather plus a plain depthwise conv was the fastest construction measured on onnxruntime CPU; a grouped conv
with group = n_in needs the same multiplicity on every channel (zero-padded kernels), and ran slower.

Per output pixel the layer costs S * (k^2 + n_out) MACs instead of n_in * n_out * k^2; a layer is rewritten
where that is lower.  The decision is MAC-based by default, so the output depends on the weights alone
(same input, same bytes).  ``measure_latency=True`` also requires onnxruntime to run the separated layer,
timed in isolation at batch 1 on ``provider``, no slower than the original: opt-in because timings vary from
run to run, and recorded per layer in ``details``.  All-zero kernels need no channel, so they are dropped.
Exact up to float summation order: the coefficients are 0 and 1.

Requires: static input shapes of the rewritten convs (for MACs; others are left alone).  Ensures (checked):
the same function on a seeded input, graph outputs unchanged, onnx.checker passes, the input model not mutated.
``details``: ``decisions`` (one per candidate conv: MACs, latencies when measured, applied, reason),
``decided_by`` ("macs" or "macs+latency") and ``provider`` where latency was measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_prune.passes.base import Pass, PassResult, copy_model
from onnx_prune.passes.merge import identical_rows
from onnx_prune.runtime.bench import benchmark
from onnx_prune.runtime.cost import concrete_shapes

SPATIAL_ATTRIBUTES = ("auto_pad", "dilations", "kernel_shape", "pads", "strides")


@dataclass
class Separation:
    """How a conv's kernels repeat: `source[j]` is the input channel of distinct kernel j, `kernels[j]` the
    kernel, `kernel_of[o, c]` the distinct kernel filter o applies to channel c (-1: a zero kernel)."""
    source: np.ndarray
    kernels: np.ndarray
    kernel_of: np.ndarray

    @property
    def size(self) -> int:
        return len(self.source)

    def coefficients(self) -> np.ndarray:
        """(n_out, S): 1 where output filter o uses distinct kernel j."""
        matrix = np.zeros((self.kernel_of.shape[0], self.size), dtype=self.kernels.dtype)
        filters, channels = np.nonzero(self.kernel_of >= 0)
        matrix[filters, self.kernel_of[filters, channels]] = 1
        return matrix


def distinct_kernels(weight: np.ndarray) -> Separation:
    """The distinct non-zero kernels of every input channel of a (n_out, n_in, k...) weight."""
    n_out, n_in = weight.shape[:2]
    kernels = weight.transpose(1, 0, *range(2, weight.ndim)).reshape(n_in * n_out, -1)  # row = (channel, filter)
    channel_of = np.repeat(np.arange(n_in), n_out)
    first, labels = identical_rows(np.column_stack([channel_of, kernels]))
    order = np.lexsort((first, channel_of[first]))  # distinct kernels channel by channel
    nonzero = np.any(kernels[first[order]] != 0, axis=1)  # a zero kernel needs no channel
    column = np.full(len(first), -1)
    column[order[nonzero]] = np.arange(int(nonzero.sum()))
    chosen = first[order[nonzero]]
    filter_of = np.tile(np.arange(n_out), n_in)
    return Separation(channel_of[chosen], weight[filter_of[chosen], channel_of[chosen]],
                      column[labels].reshape(n_in, n_out).T)


def macs_per_pixel(n_in: int, n_out: int, kernel: int, distinct: int) -> tuple[int, int]:
    """(original, separated) MACs per output pixel."""
    return n_in * n_out * kernel, distinct * (kernel + n_out)


def separated_nodes(x: gs.Variable, out: gs.Variable, conv: gs.Node, separation: Separation, name: str
                    ) -> list[gs.Node]:
    """Gather (if needed) + depthwise conv + 1x1 conv from `x` to `out`, computing what `conv` computes."""
    nodes = []
    if not np.array_equal(separation.source, np.arange(conv.inputs[1].values.shape[1])):
        replicated = gs.Variable(f"{name}_replicated", dtype=np.float32)
        nodes.append(gs.Node("Gather", f"{name}_gather", {"axis": 1},
                             [x, gs.Constant(f"{name}_channels", separation.source)], [replicated]))
        x = replicated
    depthwise = gs.Variable(f"{name}_depthwise", dtype=np.float32)
    spatial = {k: v for k, v in conv.attrs.items() if k in SPATIAL_ATTRIBUTES}
    kernels = np.ascontiguousarray(separation.kernels[:, None])  # (S, 1, k...)
    nodes.append(gs.Node("Conv", f"{name}_dw", dict(spatial, group=separation.size),
                         [x, gs.Constant(f"{name}_kernels", kernels)], [depthwise]))
    coefficients = separation.coefficients()
    coefficients = coefficients.reshape(coefficients.shape + (1,) * (kernels.ndim - 2))
    bias = [gs.Constant(f"{name}_bias", conv.inputs[2].values)] if len(conv.inputs) > 2 else []
    nodes.append(gs.Node("Conv", f"{name}_pw", {}, [depthwise, gs.Constant(f"{name}_coefficients", coefficients)]
                         + bias, [out]))
    return nodes


def isolated(conv: gs.Node, shape, separation: Separation | None, opset: int) -> onnx.ModelProto:
    """A model of `conv` alone (or, given a `separation`, of its replacement) on an input of `shape`."""
    x = gs.Variable("x", dtype=np.float32, shape=list(shape))
    y = gs.Variable("y", dtype=np.float32)
    if separation is None:
        inputs = [x] + [gs.Constant(f"w{i}", t.values) for i, t in enumerate(conv.inputs[1:])]
        nodes = [gs.Node("Conv", "conv", dict(conv.attrs), inputs, [y])]
    else:
        nodes = separated_nodes(x, y, conv, separation, "conv")
    return gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=opset))


@dataclass
class SeparationDecision:
    node: str
    n_in: int
    n_out: int
    kernel: int                 # k^2 (product of the kernel dims)
    distinct: int               # S = sum over input channels of distinct non-zero kernels
    macs_before: int            # of the layer, batch 1
    macs_after: int
    latency_before_ms: float | None
    latency_after_ms: float | None
    applied: bool
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SeparateDepthwisePass(Pass):
    """Rewrite k x k convs with few distinct kernels per input channel where it lowers MACs (and, with
    ``measure_latency``, where the separated layer is not slower on ``provider``)."""
    provider: str = "cpu"
    measure_latency: bool = False
    threads: int | None = None
    warmup: int = 5
    repeat: int = 30

    preserves_function = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        try:
            shapes = concrete_shapes(model)
        except ValueError:
            shapes = {}
        graph = gs.import_onnx(copy_model(model))
        opset = graph.opset
        decisions, rewritten = [], False
        for conv in [n for n in graph.nodes if n.op == "Conv"]:
            decision = self._decide(conv, shapes, opset)
            if decision is None:
                continue
            decisions.append(decision)
            if decision.applied:
                x, out = conv.inputs[0], conv.outputs[0]
                conv.outputs.clear()  # `out` gets its new producer below
                graph.nodes.extend(separated_nodes(x, out, conv, distinct_kernels(conv.inputs[1].values),
                                                   conv.name))
                rewritten = True
        details = {"decided_by": "macs+latency" if self.measure_latency else "macs",
                   "decisions": [d.to_dict() for d in decisions]}
        if self.measure_latency:
            details["provider"] = self.provider
        if not rewritten:
            return PassResult(copy_model(model), False, details)
        graph.cleanup().toposort()
        out = gs.export_onnx(graph)
        out.ir_version, out.producer_name = model.ir_version, model.producer_name
        return PassResult(out, True, details)

    def _decide(self, conv: gs.Node, shapes: dict, opset: int) -> SeparationDecision | None:
        """None for convs this pass does not consider (grouped, 1x1, computed weights)."""
        weight = conv.inputs[1] if len(conv.inputs) > 1 else None
        if not isinstance(weight, gs.Constant) or conv.attrs.get("group", 1) != 1 or weight.values.ndim < 3:
            return None
        if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
            return None
        n_out, n_in = weight.values.shape[:2]
        kernel = math.prod(weight.values.shape[2:])
        if kernel == 1:
            return None
        separation = distinct_kernels(weight.values)
        before, after = macs_per_pixel(n_in, n_out, kernel, separation.size)
        x_shape, y_shape = shapes.get(conv.inputs[0].name), shapes.get(conv.outputs[0].name)
        pixels = math.prod(y_shape[2:]) if y_shape and all(isinstance(d, int) for d in y_shape) else 0
        decision = SeparationDecision(conv.name, n_in, n_out, kernel, separation.size, before * pixels,
                                      after * pixels, None, None, False, "")
        if after >= before:
            decision.reason = "no fewer MACs"
            return decision
        if not pixels or not x_shape or not all(isinstance(d, int) for d in x_shape):
            decision.reason = "input shape unknown"
            return decision
        if self.measure_latency:
            decision.latency_before_ms = self._latency(isolated(conv, x_shape, None, opset))
            decision.latency_after_ms = self._latency(isolated(conv, x_shape, separation, opset))
            if decision.latency_after_ms > decision.latency_before_ms:
                decision.reason = "slower on onnxruntime"
                return decision
        decision.applied, decision.reason = True, "fewer MACs" + (", not slower" if self.measure_latency else "")
        return decision

    def _latency(self, model: onnx.ModelProto) -> float:
        result = benchmark(model, [self.provider], (1,), self.warmup, self.repeat, self.threads)
        return result[0].median_ms
