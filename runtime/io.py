"""Loading and saving ONNX models: external data, clear errors, atomic writes that never touch the input.

The guarantees `save` and `check_output_paths` give (the CLI relies on them):
- no file written (model, its `.data` file, reports, plans) is a file the input model reads: its own file or
  any external-data file its tensors name, compared by resolved path and by inode (hard links, symlinks);
- the model and its data file are written into one temporary folder beside the output, with the same file
  mode, then moved into place data first, so a reader never sees the new model without its data; on any error
  (a signal included) the temporary folder is removed and a previous `OUT.data` is put back;
- temporary folders of our own naming left by a killed run (`.onnx-prune-<pid>-*` whose process is gone) are
  swept by the next save into that folder;
- `check_result` refuses a model with a zero-sized dimension or one onnxruntime will not load, before writing.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnx_prune.errors import InvalidResultError, OutputPathError, PruneError

PROTOBUF_LIMIT = 2**31 - 1
HEADROOM = 64 * 2**20  # graph structure and small tensors besides the large weights
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
STAGING_PREFIX = ".onnx-prune-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[A-Za-z0-9_]+$")
LEGACY_STAGING_AGE_S = 3600  # staging folders without a pid (older versions) are swept after an hour


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external_data: bool  # the file kept (some) tensors in external data files


def _graph_tensors(graph: onnx.GraphProto):
    """Initializers and Constant/attribute tensors of a graph and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs):
                yield from _graph_tensors(sub)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _graph_tensors(model.graph))


def _read_error(path: Path, err: BaseException) -> str:
    if isinstance(err, PermissionError):
        return f"cannot read {path}: permission denied"
    if isinstance(err, IsADirectoryError):
        return f"not a file: {path}"
    return f"{path} is not an ONNX model ({type(err).__name__})"


def _first_line(err: BaseException, default: str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else default


def load(path: str | os.PathLike) -> LoadedModel:
    """Read `path` with its external data; raise PruneError for anything that is not a valid ONNX model."""
    path = Path(path)
    if not path.exists():
        raise PruneError(f"no such file: {path}")
    if not path.is_file():
        raise PruneError(f"not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise PruneError(_read_error(path, err)) from None
    if not model.graph.node and not model.graph.input:
        raise PruneError(f"{path} is not an ONNX model (no graph)")
    external = _uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except PermissionError:
            raise PruneError(f"{path}: cannot read its external data: permission denied") from None
        except Exception as err:  # onnx raises OSError, ValueError or its C++ ValidationError here
            raise PruneError(f"{path}: cannot read its external data: {_first_line(err, type(err).__name__)}") \
                from None
    from onnx_prune.passes.base import check_model

    try:
        check_model(model)  # the graph, and each weight's size, without serialising the weights
    except Exception as err:  # ValidationError, or a C++ error for malformed data
        raise PruneError(f"{path} is not a valid ONNX model: {_first_line(err, 'check failed')}") from None
    remember_source(model, path)
    return LoadedModel(model, path, external)


# --- reading weights

CACHED_WEIGHT_BYTES = 1 << 20  # weights up to this size are decoded once and kept; larger ones on every read


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values from its dims and type, without reading them (0 for strings)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


class WeightReader:
    """Initializer name -> array (read-only), for analysis steps that ask for the same weights many times.

    Small tensors (biases, BatchNorm parameters, shape constants: read over and over) are decoded once and
    kept; larger ones are decoded on each read and released by the caller, so that a prepared model does not
    hold a second, decoded copy of its weights for its whole life.  `shape` reads the dims without decoding."""

    def __init__(self, model: onnx.ModelProto, cache_limit: int | None = None):
        self._tensors = {t.name: t for t in model.graph.initializer}
        self._cache: dict[str, np.ndarray] = {}
        self.cache_limit = CACHED_WEIGHT_BYTES if cache_limit is None else cache_limit

    def __call__(self, name: str) -> np.ndarray:
        if name in self._cache:
            return self._cache[name]
        tensor = self._tensors[name]
        array = numpy_helper.to_array(tensor)
        if tensor_nbytes(tensor) <= self.cache_limit:
            self._cache[name] = array
        return array

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the decoded-weights cache."""
        return sum(array.nbytes for array in self._cache.values())


# --- which files a model reads, and which paths a run may write

def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files the tensors of the model at `model_path` name (resolved, whether they exist
    or not), in first-use order; empty when it cannot be parsed (`load` will say why)."""
    model_path = Path(os.path.abspath(model_path))  # onnx reads data beside the path given, not a link's target
    try:
        st = model_path.stat()
    except OSError:
        return []
    return list(_external_data_files(model_path, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _external_data_files(model_path: Path, _mtime_ns: int, _size: int) -> tuple[Path, ...]:
    """Parsed once per file version: the CLI checks its outputs before work and `save` checks again."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not our business here: loading reports it
        return ()
    found: dict[Path, None] = {}
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location:
            found[(model_path.parent / location).resolve()] = None
    return tuple(found)


def files_read_by(model_path: str | os.PathLike) -> list[Path]:
    """Every file loading `model_path` reads: the model itself, then its external-data files (resolved)."""
    model_path = Path(model_path)
    return [model_path.resolve(), *external_data_files(model_path)]


def data_path(model_path: str | os.PathLike) -> Path:
    """Where `save` writes the external data of a model saved at `model_path`: `<name>.data` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do two paths name one file: the same resolved path, or (both existing) the same inode?"""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    ia, ib = _inode(a), _inode(b)
    return ia is not None and ia == ib


def check_output_paths(input_path: str | os.PathLike | None, model: str | os.PathLike | None = None,
                       others: dict[str, str | os.PathLike] | None = None) -> None:
    """Refuse, before any work, output paths a run must not write.  `model` is the output model (its
    `.data` file is checked with it, since the run may write one); `others` maps a label (e.g. "--report")
    to a further output path.  Raises OutputPathError when an output is a file `input_path` reads (its
    model file or any of its external-data files, by resolved path or inode), when two outputs are one
    file, when an output is a folder, or when its folder is missing or not writable."""
    outputs: list[tuple[str, Path]] = []
    if model is not None:
        outputs += [("output model", Path(model)), ("output model's data file", data_path(model))]
    outputs += [(label, Path(path)) for label, path in (others or {}).items() if path is not None]
    reads = files_read_by(input_path) if input_path is not None else []
    for label, path in outputs:
        for k, read in enumerate(reads):
            if same_file(path, read):
                what = "the input model" if k == 0 else "the external data the input model reads,"
                raise OutputPathError(f"refusing to overwrite {what} {read} (it would be the {label}); "
                                      "choose another path")
        if path.is_dir():
            raise OutputPathError(f"the {label} {path} is a folder; give a file path")
        folder = path.parent
        if not folder.exists():
            raise OutputPathError(f"the folder of the {label} does not exist: {folder}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write the {label} into {folder}: permission denied")
    for i, (label_a, a) in enumerate(outputs):
        for label_b, b in outputs[i + 1:]:
            if same_file(a, b):
                raise OutputPathError(f"the {label_a} and the {label_b} are the same file {a}")


def refuse_overwrite(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Raise OutputPathError if writing `output_path` (and its `.data`) would replace a file the input reads."""
    check_output_paths(input_path, output_path)


# --- checks before writing

def zero_sized_dims(model: onnx.ModelProto) -> list[str]:
    """Tensors with a zero-sized dimension: initializers and declared inputs, outputs and value_info."""
    found = [t.name for t in _graph_tensors(model.graph) if 0 in t.dims]
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            if any(d.HasField("dim_value") and d.dim_value == 0 for d in value.type.tensor_type.shape.dim):
                found.append(value.name)
    return found


def _ort_load_problem(model: onnx.ModelProto) -> str | None:
    """Why onnxruntime (CPU, default optimisation level) cannot create a session for `model`, or None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        if model.ByteSize() < PROTOBUF_LIMIT - HEADROOM:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:
            with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX + "check-") as folder:
                path = Path(folder) / "model.onnx"
                _write_model_files(model, path, external=True)
                ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises bare Fail/InvalidGraph/RuntimeException classes
        return _first_line(err, type(err).__name__)
    return None


def check_result(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> None:
    """What every written model must satisfy, checked before writing: no zero-sized dimension, and
    onnxruntime loads it at its default optimisation level.  When onnxruntime cannot load `original` either
    (a custom-domain op), the load check is skipped.  Raises InvalidResultError (a bug of ours)."""
    empty = zero_sized_dims(model)
    if empty:
        raise InvalidResultError(f"the pruned model has zero-sized tensors ({', '.join(empty[:5])})")
    problem = _ort_load_problem(model)
    if problem is not None and (original is None or _ort_load_problem(original) is None):
        raise InvalidResultError(f"onnxruntime cannot load the pruned model: {problem}")


# --- writing

def _file_mode() -> int:
    """The mode a newly created file gets here (0666 less the umask), read without changing the umask."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX + "mode-") as folder:
        probe = Path(folder) / "probe"
        probe.touch()
        return probe.stat().st_mode & 0o777


def _externalise(model: onnx.ModelProto, data_file: Path, location: str) -> onnx.ModelProto:
    """A copy of `model` whose large tensors live in `data_file` (named `location` relative to the model).
    Written here rather than by onnx.save, whose conversion checks the location against the working
    directory and whose writer creates the file with mode 0600."""
    from onnx_prune.passes.base import model_without_weights

    out = model_without_weights(model)  # weights are added one by one: never a second copy of all of them
    with open(data_file, "wb") as data:
        for source in model.graph.initializer:
            out.graph.initializer.append(source)
            tensor = out.graph.initializer[-1]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if not tensor.HasField("raw_data"):
                if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
                    continue
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(numpy_helper.to_array(tensor)), tensor.name))
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_THRESHOLD:
                continue
            offset = data.tell()
            data.write(raw)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        data.flush()
        os.fsync(data.fileno())
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _set_field(target, name: str, value) -> None:
    if hasattr(value, "extend"):  # repeated field
        getattr(target, name).extend(value)
    elif hasattr(value, "CopyFrom"):  # sub-message
        getattr(target, name).CopyFrom(value)
    else:
        setattr(target, name, value)


def _split_fields(message, number: int) -> tuple[bytes, bytes]:
    """`message` serialised in two parts: its fields numbered below `number`, and those above (field `number`
    itself is left out)."""
    head, tail = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number != number:
            _set_field(head if field.number < number else tail, field.name, value)
    return head.SerializeToString(), tail.SerializeToString()


_GRAPH_FIELD = 7         # ModelProto.graph
_INITIALIZER_FIELD = 5   # GraphProto.initializer
_RAW_DATA_FIELD = 9      # TensorProto.raw_data


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)  # a length-delimited field


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """Serialised size of `tensor`, without serialising its raw data (ByteSize would)."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    rest = onnx.TensorProto()
    for field, value in tensor.ListFields():
        if field.name != "raw_data":
            _set_field(rest, field.name, value)
    length = len(tensor.raw_data)
    return rest.ByteSize() + len(_tag(_RAW_DATA_FIELD)) + len(_varint(length)) + length


def _serialised_parts(model: onnx.ModelProto):
    """The bytes of `model.SerializeToString()` as a sequence of parts, each weight serialised alone, so that
    writing a model never holds all of its bytes at once (upb builds them in an arena and then copies them
    into a Python bytes object: 2x the model).  Protobuf writes fields in number order: the model's fields
    before its graph, the graph (nodes, name, initializers, the rest), then the model's later fields; that
    order is checked on the weightless model, and where it does not hold the model is serialised whole."""
    from onnx_prune.passes.base import model_without_weights

    skeleton = model_without_weights(model)
    graph_head, graph_tail = _split_fields(skeleton.graph, _INITIALIZER_FIELD)
    model_head, model_tail = _split_fields(skeleton, _GRAPH_FIELD)
    skeleton_graph = graph_head + graph_tail
    if model_head + _tag(_GRAPH_FIELD) + _varint(len(skeleton_graph)) + skeleton_graph + model_tail \
            != skeleton.SerializeToString():
        yield model.SerializeToString()
        return
    sizes = [_tensor_size(t) for t in model.graph.initializer]
    graph_size = len(skeleton_graph) + sum(len(_tag(_INITIALIZER_FIELD)) + len(_varint(n)) + n for n in sizes)
    yield model_head + _tag(_GRAPH_FIELD) + _varint(graph_size) + graph_head
    for tensor, size in zip(model.graph.initializer, sizes):
        data = tensor.SerializeToString()
        if len(data) != size:
            raise AssertionError(f"{tensor.name}: serialised to {len(data)} bytes, expected {size}")
        yield _tag(_INITIALIZER_FIELD) + _varint(size)
        yield data
    yield graph_tail + model_tail


def _write_model_files(model: onnx.ModelProto, path: Path, external: bool) -> list[Path]:
    """Write `model` to `path` (and `<name>.data` beside it when external); returns the files written."""
    written = []
    if external:
        data_file = data_path(path)
        model = _externalise(model, data_file, data_file.name)
        written.append(data_file)
    with open(path, "wb") as f:
        for part in _serialised_parts(model):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    written.append(path)
    return written


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary folders of our own naming that a killed run left in `folder`: those whose process is
    gone (and pid-less ones from older versions after an hour).  Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        match = _STAGING_NAME.match(entry.name)
        if match:
            stale = int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1)))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > LEGACY_STAGING_AGE_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def write_text(path: str | os.PathLike, text: str, *, input_path: str | os.PathLike | None = None,
               label: str = "report") -> Path:
    """Write a report or plan atomically (a temporary file beside it, then a rename), with the mode a new file
    gets; refused like any output when it is a file `input_path` reads (see `check_output_paths`)."""
    path = Path(path)
    check_output_paths(input_path, others={label: path})
    sweep_stale_staging(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=path.parent))
    try:
        staged = staging / path.name
        with open(staged, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staged, _file_mode())
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Would `model` not fit in one protobuf file?"""
    return sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT - HEADROOM


_SOURCES: dict[int, str] = {}  # id(model) -> the file it was loaded or pruned from (models take no weakrefs)
_SOURCES_KEPT = 256


def remember_source(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Note that `model` came from `path`, so that `save(model, path)` refuses it without being told."""
    _SOURCES[id(model)] = str(path)
    while len(_SOURCES) > _SOURCES_KEPT:
        _SOURCES.pop(next(iter(_SOURCES)))


def source_of(model: onnx.ModelProto) -> str | None:
    """The file `model` was loaded or pruned from in this process, if known.  (An id may outlive its model
    and be reused: then a save to that same file is refused, which errs on the side of the user's input.)"""
    return _SOURCES.get(id(model))


def save(model: onnx.ModelProto, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
         external_data: bool = False) -> Path:
    """Write `model` atomically; never write a file `input_path` reads (see the module docstring).  Without
    `input_path`, the file the model was loaded or pruned from in this process is protected the same way.

    External data (one `<name>.data` file beside the model) is written when asked or when the model
    would not fit in one 2 GB protobuf.
    """
    path = Path(path)
    check_output_paths(input_path if input_path is not None else source_of(model), path)
    external = external_data or needs_external_data(model)
    folder = path.parent
    sweep_stale_staging(folder)
    mode = _file_mode()
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    final_data = data_path(path)
    backup = staging / "previous.data"
    moved_data = False
    try:
        staged = staging / path.name
        written = _write_model_files(model, staged, external)
        for file in written:
            os.chmod(file, mode)
        if external:
            if final_data.exists():  # put back if the model cannot be moved into place
                try:
                    os.link(final_data, backup)
                except OSError:  # no hard links on this file system
                    shutil.copy2(final_data, backup)
            os.replace(data_path(staged), final_data)
            moved_data = True
        os.replace(staged, path)
    except BaseException:
        if moved_data:
            if backup.exists():
                os.replace(backup, final_data)
            else:
                final_data.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
