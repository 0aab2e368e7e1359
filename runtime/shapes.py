"""Shapes without running the model: onnx shape inference, helped by folding the small shape computations
(Shape -> Gather -> arithmetic -> Concat -> Reshape/Pad/Slice) that exporters write, with numpy.

Folding evaluates only the ops in `_EVAL` and only when every result stays below `FOLD_LIMIT` elements
(sizes are checked before computing), so a 4 TB `ConstantOfShape` or an 800 MB branch is never built.
Running the model with onnxruntime to measure shapes is opt-in (`measure=True`), happens in a child process
whose address space is capped at `MEASURE_MEMORY_BYTES`, and a failure there only leaves shapes unknown.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_prune.analysis.layers import attr as _attr
from onnx_prune.runtime.sessions import model_without_initializers

SMALL_TENSOR_BYTES = 1024  # shape-carrying constants (Reshape targets, Slice bounds) are small; weights are not
FOLD_LIMIT = 1 << 16  # elements: shape computations are tiny, anything bigger is not one
MEASURE_MEMORY_BYTES = 4 << 30


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return math.prod(tensor.dims) * itemsize


def inference_skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """The model with concrete input shapes and its large initializers turned into typed graph inputs.

    Shape inference serialises the model it is given; without the weight data that is cheap,
    and inference only reads the data of small shape-like tensors.
    """
    skeleton = model_without_initializers(model)
    graph = skeleton.graph
    large = [tensor for tensor in model.graph.initializer if _tensor_bytes(tensor) > SMALL_TENSOR_BYTES]
    large_names = {tensor.name for tensor in large}
    graph.initializer.extend(
        tensor for tensor in model.graph.initializer if tensor.name not in large_names
    )
    # Older IR versions also list initializers as graph inputs; those entries are replaced.
    kept_inputs = [value for value in graph.input if value.name not in large_names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)) for tensor in large
    )
    for value in graph.input:
        if input_shapes and value.name in input_shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = size
    return skeleton


def _dims(type_proto: onnx.TypeProto) -> list | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    # a negative dim_value (some converters write -1 for a dynamic dim) is not a size
    return [(d.dim_value if d.dim_value >= 0 else None) if d.HasField("dim_value") else (d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]


# --- numpy evaluation of the ops shape computations use

def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":  # ONNX integer Div truncates toward zero
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(np.result_type(a, b))
    return np.divide(a, b).astype(np.result_type(a, b))


def _axes_input(node: onnx.NodeProto, args: list, index: int):
    axes = _attr(node, "axes")
    if axes is None and len(args) > index and args[index] is not None:
        axes = [int(a) for a in np.reshape(args[index], -1)]
    return axes


def _slice(node, args):
    data = args[0]
    if len(args) > 1:
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    else:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes", range(len(starts))), [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        s, e, st = int(s), int(e), int(st)
        dim = data.shape[int(a)]
        if st < 0:  # numpy's None is "past the start" where ONNX clamps to -1
            s = min(s, dim - 1) if s >= 0 else s
            e = None if e < -dim else e
        index[int(a)] = slice(s, e, st)
    return data[tuple(index)]


def _reshape(node, args):
    data, shape = args[0], [int(d) for d in args[1]]
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _squeeze(node, args):
    axes = _axes_input(node, args, 1)
    return np.squeeze(args[0], axis=tuple(a % args[0].ndim for a in axes) if axes is not None else None)


def _unsqueeze(node, args):
    axes = _axes_input(node, args, 1)
    rank = args[0].ndim + len(axes)
    return np.expand_dims(args[0], tuple(sorted(a % rank for a in axes)))


def _reduce(fn):
    def run(node, args):
        axes = _axes_input(node, args, 1)
        if axes is None and _attr(node, "noop_with_empty_axes", 0):
            return args[0]
        keep = bool(_attr(node, "keepdims", 1))
        return fn(args[0], axis=tuple(axes) if axes is not None else None, keepdims=keep)
    return run


def _clip(node, args):
    low = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "min")
    high = args[2] if len(args) > 2 and args[2] is not None else _attr(node, "max")
    out = args[0]
    if low is not None:
        out = np.maximum(out, np.asarray(low, dtype=out.dtype))
    if high is not None:
        out = np.minimum(out, np.asarray(high, dtype=out.dtype))
    return out


def _constant_of_shape(node, args):
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in args[0]], fill.reshape(-1)[0], dtype=fill.dtype)


def _gather(node, args):
    return np.take(args[0], args[1].astype(np.int64), axis=_attr(node, "axis", 0))


def _split(node, args):
    axis = _attr(node, "axis", 0)
    sizes = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "split")
    if sizes is None:
        n = len(node.output)
        chunk = -(-args[0].shape[axis] // n)
        sizes = [min(chunk, args[0].shape[axis] - k * chunk) for k in range(n)]
    return list(np.split(args[0], np.cumsum([int(s) for s in sizes])[:-1], axis=axis))


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _int_div, "Pow": np.power,
           "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
           "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or}
_UNARY = {"Neg": np.negative, "Abs": np.abs, "Ceil": np.ceil, "Floor": np.floor, "Round": np.round,
          "Sqrt": np.sqrt, "Sign": np.sign, "Not": np.logical_not, "Identity": lambda a: a,
          "Relu": lambda a: np.maximum(a, 0).astype(a.dtype)}
_VARIADIC = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}

_EVAL = {
    **{op: (lambda fn: lambda node, args: fn(args[0], args[1]))(fn) for op, fn in _BINARY.items()},
    **{op: (lambda fn: lambda node, args: fn(args[0]))(fn) for op, fn in _UNARY.items()},
    **{op: (lambda fn: lambda node, args: _fold_variadic(fn, args))(fn) for op, fn in _VARIADIC.items()},
    "Mod": lambda node, args: (np.fmod if _attr(node, "fmod", 0) else np.mod)(args[0], args[1]),
    "Where": lambda node, args: np.where(args[0], args[1], args[2]),
    "Cast": lambda node, args: args[0].astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to"))),
    "CastLike": lambda node, args: args[0].astype(args[1].dtype),
    "Clip": _clip,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": lambda node, args: np.concatenate(args, axis=_attr(node, "axis")),
    "Split": _split,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Flatten": lambda node, args: args[0].reshape(int(np.prod(args[0].shape[:_attr(node, "axis", 1) % max(args[0].ndim, 1)])), -1),
    "Transpose": lambda node, args: np.transpose(args[0], _attr(node, "perm")),
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda node, args: args[0] * np.ones([int(d) for d in args[1]], dtype=args[0].dtype),
    "Tile": lambda node, args: np.tile(args[0], [int(r) for r in args[1]]),
    "Range": lambda node, args: np.arange(args[0], args[1], args[2]).astype(np.result_type(args[0], args[1])),
    "Size": lambda node, args: np.array(args[0].size, dtype=np.int64),
    "ReduceProd": _reduce(np.prod), "ReduceSum": _reduce(np.sum), "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
}


EVALUATED = frozenset(_EVAL)


def _fold_variadic(fn, args):
    out = args[0]
    for arg in args[1:]:
        out = fn(out, arg)
    return out


def _result_size(node: onnx.NodeProto, args: list) -> int:
    """An upper bound on the elements `node` would produce from `args`, computed without producing them."""
    op = node.op_type
    try:
        if op == "ConstantOfShape":
            return math.prod(int(d) for d in args[0])
        if op == "Expand":
            return math.prod(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1])))
        if op == "Tile":
            return args[0].size * math.prod(int(r) for r in args[1])
        if op == "Range":
            return max(int(math.ceil((float(args[1]) - float(args[0])) / float(args[2]))), 0)
        if op in _BINARY or op in _VARIADIC or op in ("Mod", "Where"):
            return math.prod(np.broadcast_shapes(*(a.shape for a in args)))
        if op == "Concat":
            return sum(a.size for a in args)
        return max(a.size for a in args if a is not None)  # the rest only select, move or reduce elements
    except (ValueError, TypeError, OverflowError, ZeroDivisionError):
        return FOLD_LIMIT + 1


def evaluate(node: onnx.NodeProto, args: list) -> list[np.ndarray] | None:
    """The outputs of `node` on numpy `args` (None for an absent optional input), or None when the op is not
    one shape computations use, a result would exceed FOLD_LIMIT elements, or numpy cannot compute it."""
    run = _EVAL.get(node.op_type)
    if run is None or node.domain not in ("", "ai.onnx") or any(a is None for a in args[:1]):
        return None
    if _result_size(node, args) > FOLD_LIMIT:
        return None
    try:
        with np.errstate(all="ignore"):
            out = run(node, args)
    except Exception:  # an input numpy cannot take (bad axes, zero division): not folded, stays unknown
        return None
    outs = [np.asarray(o) for o in (out if isinstance(out, list) else [out])]
    return outs if all(o.size <= FOLD_LIMIT for o in outs) else None


# --- folding shape computations for inference

def _shape_value(node: onnx.NodeProto, dims) -> np.ndarray | None:
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return np.asarray(dims[start:end], dtype=np.int64)


def _static_count(dims) -> int:
    return -1 if dims is None else sum(isinstance(d, int) for d in dims)


def _collect(inferred: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, list | None]:
    shapes: dict[str, list | None] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[value.name] = _dims(value.type)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is advisory: rules freeze what they cannot see the shape of
        return model


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
                  ) -> tuple[dict[str, list | None], dict[str, np.ndarray]]:
    """Tensor name -> dims, and the values of the shape computations folded on the way.

    One pass of onnx inference over the whole graph, then one pass in graph order that folds each small shape
    computation it can (`evaluate`) and re-infers, node by node, the outputs the first pass left incomplete
    with the folded values as known data: a folded Pad amount or Reshape target gives the next shape, whose
    Shape gives the next fold.  Nothing is executed beyond `evaluate`'s small numpy ops.
    """
    skeleton = inference_skeleton(model, input_shapes)
    inferred = _infer(skeleton)
    types: dict[str, onnx.TypeProto] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        types[value.name] = value.type
    for tensor in model.graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    small = {t.name: t for t in model.graph.initializer if _tensor_bytes(t) <= SMALL_TENSOR_BYTES}
    values: dict[str, np.ndarray] = {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def value(name: str):
        if name not in values and name in small:
            values[name] = numpy_helper.to_array(small[name])
        return values.get(name)

    def dims(name: str):
        return _dims(types[name]) if name in types else None

    skip = 0 if input_shapes else 1  # with the inputs fixed, an open batch dim is a loss too
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or _has_subgraph(node):
            continue
        if node.op_type == "Shape":
            folded = _shape_value(node, dims(node.input[0]))
            if folded is not None:
                values[node.output[0]] = folded
        elif node.op_type in _EVAL:
            args = [value(name) if name else None for name in node.input]
            if all(a is not None for a, name in zip(args, node.input) if name):
                outs = evaluate(node, args)
                for name, out in zip(node.output, outs or []):
                    if name:
                        values[name] = out
        outputs = [o for o in node.output if o]
        if all(dims(o) is not None and all(isinstance(d, int) for d in dims(o)[skip:]) for o in outputs):
            continue  # complete (but for a batch left open): nothing to gain
        given = {name: types[name] for name in node.input if name in types}
        if node.op_type in ("Conv", "ConvTranspose") and dims(node.input[0]) is None and node.input[1] in given:
            # the input comes from an op inference cannot see through (a custom op): its rank is the weight's
            rank = len(dims(node.input[1]) or [])
            given[node.input[0]] = helper.make_tensor_type_proto(
                types[node.input[1]].tensor_type.elem_type, [None] * rank)
        if not all(name in given for name in node.input if name):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            data = {name: numpy_helper.from_array(np.asarray(values[name]), name)
                    for name in node.input if name in values}
            found = onnx.shape_inference.infer_node_outputs(
                schema, node, given, data, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        except Exception:  # an op inference cannot handle alone: keep what the whole-graph pass found
            continue
        for name, type_proto in found.items():
            if _static_count(_dims(type_proto)) > _static_count(dims(name)):
                types[name] = type_proto
    shapes = {name: _dims(t) for name, t in types.items()}
    for name, folded in values.items():  # folded tensors keep their own shapes even where inference dropped them
        if shapes.get(name) is None:
            shapes[name] = list(np.shape(folded))
    return shapes, values


# --- opt-in measurement: run the model, bounded in memory, in a child process

_MEASURE_SCRIPT = r"""
import json, resource, sys
import numpy as np
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import onnxruntime as ort
feed = dict(np.load(sys.argv[2]))
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
names = json.loads(sys.stdin.read())
print(json.dumps({n: list(v.shape) for n, v in zip(names, session.run(names, feed))}))
"""


def exposing(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate `tensors` (those not already outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    return probe


def measure_shapes(model: onnx.ModelProto, names: list[str], feed: dict,
                   memory_limit: int = MEASURE_MEMORY_BYTES, timeout_s: float = 300) -> dict[str, tuple]:
    """Shapes of some intermediate tensors, measured by one onnxruntime run on `feed` in a child process whose
    address space is capped at `memory_limit` bytes.  Returns {} when the run fails for any reason."""
    probe = exposing(model, names)
    with tempfile.TemporaryDirectory(prefix=".onnx-prune-measure-") as folder:
        model_path, feed_path = os.path.join(folder, "m.onnx"), os.path.join(folder, "feed.npz")
        onnx.save(probe, model_path, save_as_external_data=probe.ByteSize() > (1 << 30), location="m.onnx.data")
        np.savez(feed_path, **feed)
        try:
            done = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, model_path, feed_path, str(memory_limit)],
                                  input=json.dumps(names), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {}
    if done.returncode != 0:
        return {}
    try:
        return {n: tuple(d) for n, d in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        return {}


def _fixed_except_batch(model: onnx.ModelProto) -> dict[str, list[int]] | None:
    """The input shapes at batch 1 when every other input dim is static, else None."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    shapes = {}
    for value in inputs:
        dims = _dims(value.type)
        if dims is None or not all(isinstance(x, int) for x in dims[1:]):
            return None
        shapes[value.name] = [1 if not isinstance(dims[0], int) else dims[0]] + list(dims[1:]) if dims else []
    return shapes if inputs else None


def _complete(model: onnx.ModelProto, shapes: dict[str, list | None], measure: bool) -> None:
    """Where inference lost a size that the inputs fix (a Slice bound, Reshape target or Pad computed from a
    shape), fold the shape computations at batch 1 (or, opt-in, measure them); the batch dim stays symbolic."""
    produced = [o for n in model.graph.node for o in n.output if o]
    lost = [name for name in produced if shapes.get(name) is None
            or any(not isinstance(d, int) for d in shapes[name][1:])]
    fixed = _fixed_except_batch(model)
    if not lost or fixed is None:
        return
    static, _ = static_shapes(model, fixed)
    found = {name: static[name] for name in lost if static.get(name) is not None
             and (shapes.get(name) is None or len(static[name]) == len(shapes[name]))
             and all(isinstance(d, int) for d in static[name][1:])}
    still = [name for name in lost if name not in found]
    if still and measure:
        from onnx_prune.runtime.fidelity import make_inputs

        found.update(measure_shapes(model, still, make_inputs(model, samples=1, batch=1)[0]))
    for name, dims in found.items():
        batch = shapes[name][0] if shapes.get(name) else None  # measured at batch 1: keep the batch open
        shapes[name] = [batch] + [int(d) for d in dims[1:]]


def infer_shapes(model: onnx.ModelProto, measure: bool = False) -> dict[str, list | None]:
    """Tensor name -> dims (int, symbolic str or None) for every value onnx can infer, plus initializers.
    Shape computations are folded (see `static_shapes`); with `measure`, sizes still missing are measured by
    running the model once, bounded in memory."""
    shapes, _ = static_shapes(model)
    _complete(model, shapes, measure)
    return shapes
