"""onnxruntime sessions, execution providers and model input signatures.

Shared by `cost`, `fidelity` and `bench`: one place decides which providers really
run here, how a model's dynamic input dims become concrete, and how sessions are
created and reused.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

ModelLike = onnx.ModelProto | str | os.PathLike

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}

# protobuf cannot serialise a message of 2 GiB or more; such models go through a file.
PROTO_LIMIT_BYTES = 2**31 - 1
_SESSION_CACHE_SIZE = 4
_session_cache: OrderedDict[tuple, ort.InferenceSession] = OrderedDict()


# --- providers -------------------------------------------------------------------


def provider_name(name: str) -> str:
    """Full onnxruntime provider name for a short alias ("cpu", "cuda", "tensorrt"/"trt")."""
    return _PROVIDER_ALIASES.get(name.lower(), name)


def provider_chain(primary: str) -> list[str]:
    """Session provider list for `primary`, with fallbacks for the nodes it cannot run."""
    primary = provider_name(primary)
    if primary == TENSORRT:
        return [TENSORRT, CUDA, CPU]
    return [primary] if primary == CPU else [primary, CPU]


def _probe_model() -> bytes:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "provider_probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    # IR 8 / opset 13 load on every supported onnxruntime.
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def provider_problem(provider: str) -> str | None:
    """Why `provider` cannot run on this machine, or None when a session really uses it.

    The GPU build lists CUDA/TensorRT even without a usable GPU or CUDA libraries, and
    then silently falls back to CPU, so the test is `get_providers()` of a real session.
    Cached per process: probing CUDA costs a context initialisation.
    """
    provider = provider_name(provider)
    built = ort.get_available_providers()
    if provider not in built:
        return f"not in this onnxruntime build (has: {', '.join(built)})"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(_probe_model(), sess_options=options, providers=provider_chain(provider))
    except Exception as error:  # onnxruntime raises bare RuntimeError/Fail subclasses
        return f"failed to start: {str(error).splitlines()[0]}"
    if provider not in session.get_providers():
        return "listed but failed to initialise (missing GPU, driver or CUDA/cuDNN libraries?)"
    return None


def available_providers(requested: list[str] | None = None) -> list[str]:
    """The requested providers that really run here, in requested order.

    Each unusable one is dropped with a one-line notice on stderr; when none is left
    the result is ["CPUExecutionProvider"]. Aliases ("cuda", "trt") are accepted.
    TensorRT is only used when asked for. With `requested=None`: CUDA when it works,
    otherwise CPU, silently.
    """
    if requested is None:
        return [CUDA] if provider_problem(CUDA) is None else [CPU]
    wanted = list(dict.fromkeys(provider_name(name) for name in requested))
    problems = {provider: provider_problem(provider) for provider in wanted}
    usable = [provider for provider in wanted if problems[provider] is None]
    consequence = "skipping it" if usable else f"falling back to {CPU}"
    for provider, problem in problems.items():
        if problem is not None:
            print(f"onnx-prune: {provider} {problem}; {consequence}", file=sys.stderr)
    return usable or [CPU]


# --- input signature -------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One graph input: dims are ints, dim_param names, or None for an unnamed unknown dim.

    `dims` is None when the model does not declare the rank at all.
    """

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None


def load_graph_only(model_or_path: ModelLike) -> onnx.ModelProto:
    """The model itself, or the file's model without its external weight files."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return onnx.load(os.fspath(model_or_path), load_external_data=False)


def input_specs(model_or_path: ModelLike) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    graph = load_graph_only(model_or_path).graph
    initializer_names = {tensor.name for tensor in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializer_names:
            continue
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"input {value.name!r} is not a tensor; only tensor inputs are supported")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, value_dims(value)))
    return specs


def value_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """Dims of a tensor value: int, dim_param name, or None; None overall when rank is unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim
    )


def resolve_input_shapes(
    specs: list[InputSpec], shapes: dict[str, list[int]] | None = None, batch: int | None = None
) -> dict[str, list[int]]:
    """Concrete shape per input.

    A symbolic dim takes its size from `shapes[name]` (a full shape), except that a
    symbolic leading dim takes `batch` when given, else `shapes`, else 1. Fixed dims
    are kept and must agree with `shapes`. Raises ValueError naming any dim left open.
    """
    shapes = shapes or {}
    unknown = set(shapes) - {spec.name for spec in specs}
    if unknown:
        raise ValueError(
            f"shapes given for unknown input(s) {sorted(unknown)}; model inputs: {[spec.name for spec in specs]}"
        )
    resolved = {}
    for spec in specs:
        given = shapes.get(spec.name)
        dims = spec.dims
        if dims is None:
            if given is None:
                raise ValueError(f"input {spec.name!r} has no declared shape; give it with shapes={{{spec.name!r}: [...]}}")
            dims = (None,) * len(given)
        if given is not None and len(given) != len(dims):
            raise ValueError(f"shapes[{spec.name!r}] has rank {len(given)}, the model input has rank {len(dims)}")
        concrete = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                if given is not None and given[axis] != dim:
                    raise ValueError(
                        f"shapes[{spec.name!r}][{axis}] = {given[axis]} but the model fixes that dim to {dim}"
                    )
                size = dim
            elif axis == 0 and batch is not None:
                size = batch
            elif given is not None:
                size = given[axis]
            elif axis == 0:
                size = 1
            else:
                label = f" ({dim!r})" if dim else ""
                raise ValueError(
                    f"input {spec.name!r} dim {axis}{label} is dynamic; give its size with "
                    f"shapes={{{spec.name!r}: [...{len(dims)} ints]}}"
                )
            if int(size) <= 0:
                raise ValueError(f"input {spec.name!r} dim {axis} must be positive, got {size}")
            concrete.append(int(size))
        resolved[spec.name] = concrete
    return resolved


# --- models and sessions ---------------------------------------------------------


def _copy_fields(source, target, skip: set[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # sub-message
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def model_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose main graph has no initializers, made without copying weights."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip={"graph"})
    _copy_fields(model.graph, skeleton.graph, skip={"initializer"})
    return skeleton


def _save_with_external_weights(model: onnx.ModelProto, directory: str) -> str:
    """Write `model` as model.onnx + weights.bin without touching the caller's proto.

    (`onnx.save_model(save_as_external_data=True)` would rewrite the caller's tensors.)
    """
    skeleton = model_without_initializers(model)
    with open(os.path.join(directory, "weights.bin"), "wb") as weights:
        for tensor in model.graph.initializer:
            data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
            reference = skeleton.graph.initializer.add()
            reference.name = tensor.name
            reference.data_type = tensor.data_type
            reference.dims.extend(tensor.dims)
            reference.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(weights.tell())), ("length", str(len(data)))):
                entry = reference.external_data.add()
                entry.key, entry.value = key, value
            weights.write(data)
    path = os.path.join(directory, "model.onnx")
    onnx.save_model(skeleton, path)
    return path


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # only errors: warnings about e.g. unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def make_session(
    model_or_path: ModelLike, providers: list[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session, reused while the same model, providers and threads recur.

    `providers` is onnxruntime's priority list (default CPU only); `threads` sets
    intra-op threads (None: onnxruntime's default). A ModelProto must carry its weights;
    one of 2 GiB or more is written to a temporary directory that lives as long as the
    session (such sessions are not cached: hashing that much would cost more than it saves).
    """
    providers = [provider_name(name) for name in providers or [CPU]]
    options = _session_options(threads)
    if isinstance(model_or_path, onnx.ModelProto):
        if model_or_path.ByteSize() >= PROTO_LIMIT_BYTES:
            directory = tempfile.TemporaryDirectory(prefix="onnx_prune_")
            path = _save_with_external_weights(model_or_path, directory.name)
            session = ort.InferenceSession(path, sess_options=options, providers=providers)
            weakref.finalize(session, directory.cleanup)
            return session
        source = model_or_path.SerializeToString()
        identity = hashlib.sha256(source).hexdigest()
    else:
        source = os.fspath(model_or_path)
        stat = os.stat(source)
        identity = (os.path.realpath(source), stat.st_mtime_ns, stat.st_size)
    key = (identity, tuple(providers), threads)
    session = _session_cache.get(key)
    if session is None:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
        _session_cache[key] = session
        if len(_session_cache) > _SESSION_CACHE_SIZE:
            _session_cache.popitem(last=False)
    _session_cache.move_to_end(key)
    return session


def runtime_versions() -> dict:
    """Library and platform versions, for reproducible reports."""
    return {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "available_providers": ort.get_available_providers(),
    }
