"""Loading and saving ONNX models: external data, clear errors, atomic writes."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnx_prune.errors import PruneError

PROTOBUF_LIMIT = 2**31 - 1
HEADROOM = 64 * 2**20  # graph structure and small tensors besides the large weights


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external_data: bool  # the file kept (some) tensors in external data files


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


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
        raise PruneError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    if not model.graph.node and not model.graph.input:
        raise PruneError(f"{path} is not an ONNX model (no graph)")
    external = _uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as err:
            raise PruneError(f"{path}: cannot read its external data: {err}") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "check failed"
        raise PruneError(f"{path} is not a valid ONNX model: {first}") from None
    return LoadedModel(model, path, external)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def refuse_overwrite(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Raise PruneError if writing `output_path` would replace the input model or its external data file."""
    src, path = Path(input_path), Path(output_path)
    if _same_file(path, src):
        raise PruneError(f"refusing to overwrite the input model {src}; choose another output path")
    src_data = src.with_name(src.name + ".data")
    if src_data.exists() and path.with_name(path.name + ".data").resolve() == src_data.resolve():
        raise PruneError(f"refusing to overwrite the input's external data {src_data}")


def save(model: onnx.ModelProto, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
         external_data: bool = False) -> Path:
    """Write `model` atomically (temp folder + rename); never overwrite `input_path` or its data file.

    External data (one `<name>.data` file beside the model) is written when asked or when the model
    would not fit in one 2 GB protobuf.
    """
    path = Path(path)
    data_name = path.name + ".data"
    if input_path is not None:
        refuse_overwrite(input_path, path)
    if not path.parent.exists():
        raise PruneError(f"output folder does not exist: {path.parent}")
    external = external_data or sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT - HEADROOM
    staging = Path(tempfile.mkdtemp(prefix=".onnx-prune-", dir=path.parent))
    try:
        staged = staging / path.name
        if external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)  # onnx.save converts tensors to external in place
            onnx.save(to_write, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
            if (staging / data_name).exists():
                os.replace(staging / data_name, path.parent / data_name)
        else:
            with open(staged, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
