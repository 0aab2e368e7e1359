"""Passes with executable contracts, shaped like ``onnx_ir.passes``.

A pass subclasses `Pass` and implements ``call(model) -> PassResult``.  Calling the pass runs

    requires(model)  ->  call(model)  ->  ensures(model, result)

and a broken promise raises `PreconditionError` (before the work) or `PostconditionError` (after it), both
`PassContractError`s.  The default ``ensures`` checks what every pass promises:

- onnx.checker accepts the result;
- the graph outputs keep their names and declared shapes (symbolic dims may be named differently);
- the input model was not mutated (its serialised bytes are unchanged);
- with ``preserves_function = True`` (weight-only rewrites such as BatchNorm folding): the result computes the
  same outputs as the input on one seeded generated input, to ``function_tolerance`` relative L2 error.

`PassResult.details` holds what a pass has to say (per-layer decisions, counts), so a pass has one entry point.
`Sequential` composes passes; its details are keyed by pass name.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import onnx

DIRECT_CHECK_BYTES = 1 << 23  # models with fewer bytes of weights reach onnx.checker whole (in memory, fast)


def precision_scale(model: onnx.ModelProto) -> float:
    """How much looser than float32 a function check must be: float16/bfloat16 outputs round ~1e3x coarser
    (folding a BatchNorm into float16 weights measured 4.8e-4 relative error)."""
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = {o.type.tensor_type.elem_type for o in model.graph.output}
    return 100.0 if types & low else 1.0


class PassContractError(Exception):
    """A pass broke its contract: a precondition did not hold, or the result does not keep a promise."""


class PreconditionError(PassContractError):
    """The input model does not meet what the pass requires."""


class PostconditionError(PassContractError):
    """The pass's result breaks what the pass ensures."""


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    details: dict = field(default_factory=dict)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: passes never mutate their input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def output_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Declared graph output dims, the postcondition every pass keeps."""
    return {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output}


def output_signature(model: onnx.ModelProto) -> dict[str, list]:
    """Graph output names with their fixed dims; a dynamic dim (a name, or no positive size) is "?", so a pass
    may name or rename symbolic dims without changing what the outputs are."""
    return {name: [d if isinstance(d, int) and d > 0 else "?" for d in dims]
            for name, dims in output_dims(model).items()}


def model_digest(model: onnx.ModelProto) -> str:
    """A fingerprint of everything in the model: the graph's nodes, inputs, outputs and metadata serialised (ONNX
    protos have no map fields, so serialisation is stable), and each weight's name, type, dims and bytes through
    CRC-32 -- a mutation check, not a security hash, and ~10x cheaper than serialising a 100 MB model twice."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in (graph.node, graph.input, graph.output, graph.value_info, graph.sparse_initializer,
                 model.opset_import, model.metadata_props, model.functions):
        for item in part:
            digest.update(item.SerializeToString())
    digest.update(f"{model.ir_version}|{graph.name}".encode())
    for tensor in graph.initializer:
        payload = tensor.raw_data if tensor.HasField("raw_data") else tensor.SerializeToString()
        digest.update(f"{tensor.name}|{tensor.data_type}|{list(tensor.dims)}|{len(payload)}|"
                      f"{zlib.crc32(payload)}|{len(tensor.external_data)}".encode())
        for entry in tensor.external_data:
            digest.update(entry.SerializeToString())
    return digest.hexdigest()


STUB_BYTES = 1024  # weights at least this large reach onnx.checker as stubs; their sizes are checked here
STUB_FILE = "weights.stub"
_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # older protobuf
        return len(message.UnknownFields()) > 0
    return len(UnknownFieldSet(message)) > 0


def model_without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose main graph has no initializers, made without copying any weight.  (A model or graph
    carrying fields this onnx does not know is copied whole and emptied instead: a field-by-field copy would
    drop them.)"""
    from onnx_prune.runtime.sessions import model_without_initializers

    if _has_unknown_fields(model) or _has_unknown_fields(model.graph):
        out = copy_model(model)
        del out.graph.initializer[:]
        return out
    return model_without_initializers(model)


def _stub(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
    """The tensor as onnx.checker may see it without its bytes (data in an empty file of the check's folder),
    after checking here what the checker checks of them; None for a small tensor, checked as it is."""
    from onnx_prune.runtime.io import tensor_nbytes

    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    needed = tensor_nbytes(tensor)
    if not external and (needed < STUB_BYTES or not tensor.HasField("raw_data")):
        return None
    if not external:
        if any(len(getattr(tensor, name)) for name in _DATA_FIELDS):
            raise onnx.checker.ValidationError(f"TensorProto (tensor name: {tensor.name}) should contain one and "
                                               "only one value field.")
        size = len(tensor.raw_data)
        if size < needed:
            raise onnx.checker.ValidationError(
                f"TensorProto (tensor name: {tensor.name}) raw_data size ({size} bytes) is too small for the "
                f"declared shape and type ({needed} bytes required).")
    elif not any(entry.key == "location" and entry.value for entry in tensor.external_data):
        raise onnx.checker.ValidationError(f"TensorProto (tensor name: {tensor.name}) is stored externally but "
                                           "doesn't have a location.")
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                            doc_string=tensor.doc_string, data_location=onnx.TensorProto.EXTERNAL)
    entry = stub.external_data.add()
    entry.key, entry.value = "location", STUB_FILE
    return stub


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on `model` without serialising its weights: the checker sees the graph with every large
    initializer as a stub of the same name, type and dims (its data in an empty file, which the checker does
    not read), and each stubbed tensor's bytes are checked here as the checker would (one value field, at
    least as many bytes as its dims and type need).  Small tensors, subgraphs and everything else reach the
    checker as they are; a model with under DIRECT_CHECK_BYTES of weights goes to it whole, in memory.
    (Serialising every weight for the checker cost ~0.3 s and a transient 2x the model -- the bytes and the
    checker's parsed copy -- per check of a 100 MB model.)  Raises onnx.checker.ValidationError."""
    from onnx_prune.runtime.io import tensor_nbytes

    if sum(tensor_nbytes(t) for t in model.graph.initializer) < DIRECT_CHECK_BYTES:
        onnx.checker.check_model(model)
        return
    skeleton = model_without_weights(model)
    for tensor in model.graph.initializer:
        stub = _stub(tensor)
        skeleton.graph.initializer.append(tensor if stub is None else stub)
    with tempfile.TemporaryDirectory(prefix="onnx_prune_check_") as directory:
        open(os.path.join(directory, STUB_FILE), "wb").close()
        path = os.path.join(directory, "model.onnx")
        with open(path, "wb") as f:
            f.write(skeleton.SerializeToString())
        onnx.checker.check_model(path)


RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def output_difference(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0) -> float:
    """Largest relative L2 error over the outputs of `after` against `before` on one seeded generated input
    (non-finite values must sit at the same places and are left out).  Raises ValueError where the comparison
    cannot be made: no input can be generated (an input dim without a size), or the model draws random numbers."""
    from onnx_prune.runtime.fidelity import make_inputs, relative_error
    from onnx_prune.runtime.sessions import make_session

    drawn = sorted({n.op_type for n in before.graph.node} & RANDOM_OPS)
    if drawn:
        raise ValueError(f"the model draws random numbers ({', '.join(drawn)})")
    feed = make_inputs(before, seed=seed, samples=1)[0]
    reference = make_session(before).run(None, feed)
    candidate = make_session(after).run(None, feed)
    worst = 0.0
    for ref, cand in zip(reference, candidate):
        ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
        if ref.shape != cand.shape:
            return float("inf")
        finite = np.isfinite(ref)
        if not np.array_equal(finite, np.isfinite(cand)):
            return float("inf")
        ref, cand = ref[finite], cand[finite]
        worst = max(worst, relative_error(ref, cand))
    return worst


class Pass(ABC):
    """Base class: subclasses implement `call`, and refine `requires` / `ensures` (calling super's)."""

    preserves_function: bool = False     # ensures: equal outputs on one seeded input
    function_tolerance: float = 1e-4     # relative L2 error allowed by that check (float rounding)
    function_seed: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PreconditionError where `model` is not something this pass can work on."""
        if not isinstance(model, onnx.ModelProto) or not model.HasField("graph"):
            raise PreconditionError(f"{self.name} needs an onnx.ModelProto with a graph")

    @abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        """The pass's work on `model` (never mutated): the new model, whether it changed, and details."""

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        """Raise PostconditionError where `result` breaks a promise (see the module docstring)."""
        after = result.model
        try:
            check_model(after)
        except (onnx.checker.ValidationError, ValueError) as error:
            raise PostconditionError(f"{self.name}: the result fails onnx.checker: {error}") from error
        if output_signature(after) != output_signature(before):
            raise PostconditionError(f"{self.name} changed the graph outputs: {output_signature(before)} -> "
                                     f"{output_signature(after)}")
        if self.preserves_function and result.modified:
            try:
                error = output_difference(before, after, self.function_seed)
            except ValueError as reason:  # no generated input: the check cannot run
                result.details["function_check"] = f"not run: {reason}"
                return
            result.details["function_check"] = {"max_relative_error": error}
            if not error <= self.function_tolerance * precision_scale(after):
                raise PostconditionError(f"{self.name} promises the same function, but outputs differ by "
                                         f"{error:.3g} (relative) on a seeded input")

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        digest = model_digest(model)
        result = self.call(model)
        if model_digest(model) != digest:
            raise PostconditionError(f"{self.name} mutated its input model")
        self.ensures(model, result)
        return result


class Sequential(Pass):
    """Passes applied in order; modified if any of them modified the model; details keyed by pass name
    (``Name#2`` for a second pass of the same name).  Each pass checks its own contract."""

    def __init__(self, *passes: Pass):
        self.passes = passes

    def call(self, model: onnx.ModelProto) -> PassResult:
        details, modified = {}, False
        for step in self.passes:
            result = step(model)
            key, n = step.name, 1
            while key in details:
                n += 1
                key = f"{step.name}#{n}"
            details[key] = result.details
            model, modified = result.model, modified or result.modified
        return PassResult(model, modified, details)

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        """Every step has checked its own result already; the composition keeps the outputs."""
        if output_signature(result.model) != output_signature(before):
            raise PostconditionError(f"{self.name} changed the graph outputs")
