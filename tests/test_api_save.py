"""`onnx_prune.save` as a pipeline step: it refuses to overwrite the model a pruned model came from, even when the
caller does not say where that was."""
import shutil

import onnx
import pytest

import onnx_prune
from conftest import fixture_path


def test_save_refuses_the_source_of_a_pruned_model(tmp_path):
    source = tmp_path / "model.onnx"
    shutil.copy(fixture_path("se"), source)
    before = source.read_bytes()
    pruned, _ = onnx_prune.prune(str(source), ratio=0.5)
    with pytest.raises(onnx_prune.PruneError, match="refusing to overwrite the input model"):
        onnx_prune.save(pruned, source)
    assert source.read_bytes() == before
    onnx_prune.save(pruned, tmp_path / "pruned.onnx")  # anywhere else is fine
    onnx.checker.check_model(str(tmp_path / "pruned.onnx"), full_check=True)


def test_save_refuses_the_file_a_model_was_loaded_from(tmp_path):
    source = tmp_path / "model.onnx"
    shutil.copy(fixture_path("se"), source)
    loaded = onnx_prune.load(str(source)).model
    with pytest.raises(onnx_prune.PruneError):
        onnx_prune.save(loaded, source)


# --- writing without a second copy of the model (issue 14: the tool's own memory)

@pytest.mark.parametrize("name", ["se", "if_subgraph", "constant_weights", "external_data", "opset21"])
def test_save_writes_the_bytes_onnx_writes_one_weight_at_a_time(tmp_path, name):
    """The file `save` writes is byte for byte `model.SerializeToString()` (and `onnx.save`'s output), though it
    is written in parts with each weight serialised alone: the whole model's bytes are never built."""
    from onnx_prune.runtime import io

    model = onnx_prune.load(str(fixture_path(name))).model
    parts = list(io._serialised_parts(model))
    assert len(parts) == 2 + 2 * len(model.graph.initializer)  # head, (field header, weight) per weight, tail
    assert parts[2:-1:2] == [t.SerializeToString() for t in model.graph.initializer]
    out = onnx_prune.save(model, tmp_path / "out.onnx")
    assert out.read_bytes() == model.SerializeToString()
    onnx.save(model, str(tmp_path / "by_onnx.onnx"))
    assert out.read_bytes() == (tmp_path / "by_onnx.onnx").read_bytes()


def test_save_with_external_data_keeps_every_weight(tmp_path):
    import numpy as np
    from onnx import numpy_helper

    model = onnx_prune.load(str(fixture_path("residual_add"))).model
    out = onnx_prune.save(model, tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    back = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
