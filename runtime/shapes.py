"""Shape inference that does not copy the weights."""
from __future__ import annotations

import onnx

Dim = "int | str | None"  # static size, symbolic name, or unknown
SMALL_TENSOR_BYTES = 1024  # shape-carrying constants are small; weights are not


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers' data stripped: inference only needs their dims."""
    light = onnx.ModelProto()
    light.CopyFrom(model)  # cheap relative to serialisation, which infer_shapes would do
    for tensor in light.graph.initializer:
        if len(tensor.raw_data) > SMALL_TENSOR_BYTES:
            tensor.ClearField("raw_data")
    return light


def _dims(type_proto: onnx.TypeProto) -> list | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]


def infer_shapes(model: onnx.ModelProto) -> dict[str, list | None]:
    """Tensor name -> dims (int, symbolic str or None) for every value onnx can infer, plus initializers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(model), data_prop=True)
    except Exception:  # inference is advisory: rules fall back to freezing where a shape is missing
        inferred = model
    graph = inferred.graph
    shapes: dict[str, list | None] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes[value.name] = _dims(value.type)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes
