"""Shape inference that does not copy the weights."""
from __future__ import annotations

import math

import numpy as np
import onnx

from onnx_prune.runtime.sessions import model_without_initializers

SMALL_TENSOR_BYTES = 1024  # shape-carrying constants (Reshape targets, Slice bounds) are small; weights are not


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


def measure_shapes(model: onnx.ModelProto, names: list[str], feed: dict) -> dict[str, tuple]:
    """Shapes of some intermediate tensors, measured by one onnxruntime run on `feed`."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n: tuple(v.shape) for n, v in zip(names, session.run(names, feed))}


def _fixed_except_batch(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    return bool(inputs) and all(d is not None and all(isinstance(x, int) for x in d[1:])
                                for d in (_dims(i.type) for i in inputs))


def _complete(model: onnx.ModelProto, shapes: dict[str, list | None]) -> None:
    """Where inference lost a size that the inputs fix (a Slice bound or Reshape target computed from a
    shape), measure it once at batch 1; the batch dim stays symbolic."""
    from onnx_prune.runtime.fidelity import make_inputs

    produced = [o for n in model.graph.node for o in n.output if o]
    lost = [name for name in produced if shapes.get(name) is not None
            and any(not isinstance(d, int) for d in shapes[name][1:])]
    if not lost or not _fixed_except_batch(model):
        return
    try:
        measured = measure_shapes(model, lost, make_inputs(model, samples=1, batch=1)[0])
    except Exception:  # measuring is a bonus: rules freeze what they still cannot see
        return
    for name, dims in measured.items():
        shapes[name] = [shapes[name][0]] + [int(d) for d in dims[1:]]


def infer_shapes(model: onnx.ModelProto) -> dict[str, list | None]:
    """Tensor name -> dims (int, symbolic str or None) for every value onnx can infer, plus initializers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(inference_skeleton(model), data_prop=True)
    except Exception:  # inference is advisory: rules freeze what they cannot see the shape of
        inferred = model
    shapes: dict[str, list | None] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[value.name] = _dims(value.type)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    _complete(model, shapes)
    return shapes
