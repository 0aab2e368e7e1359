"""What every pass returns, and the checks passes share."""
from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: passes never mutate their input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def output_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Declared graph output dims, the postcondition every pass keeps."""
    return {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output}
