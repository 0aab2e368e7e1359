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
