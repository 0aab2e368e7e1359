"""What the tool holds and copies while it works (issue 14, cost of the tool): a prepared model keeps no decoded
copy of its large weights, criteria read ranks and shapes from the initializers' dims, and the weight reader
gives the same arrays as decoding each tensor.  Memory and time figures live in benchmarks/tool_cost.py and
benchmarks/prune_speed.py; these tests assert the behaviour behind them."""
import numpy as np
import pytest
from onnx import numpy_helper

import onnx_prune.runtime.io as io
from onnx_prune.analysis.criteria import Scoring, channel_scores, filter_sets, removed_weights
from onnx_prune.pipeline import prepare

from conftest import fixture_path


class CountingReader(io.WeightReader):
    """A WeightReader that records every decode (the cache limit 0: every tensor counts as large)."""

    def __init__(self, model):
        super().__init__(model, cache_limit=0)
        self.decoded: list[str] = []

    def __call__(self, name):
        self.decoded.append(name)
        return super().__call__(name)


@pytest.mark.parametrize("fixture", ["residual_add", "depthwise", "concat", "se"])
def test_reader_gives_the_decoded_arrays_and_their_dims(fixture):
    prepared = prepare(fixture_path(fixture))
    reader = prepared.weights()
    for tensor in prepared.model.graph.initializer:
        expected = numpy_helper.to_array(tensor)
        assert np.array_equal(reader(tensor.name), expected)
        assert reader.shape(tensor.name) == expected.shape


@pytest.mark.parametrize("criterion", ["l2", "bnvar", "fpgm"])
def test_scoring_keeps_no_large_weight_decoded(monkeypatch, criterion):
    """After every group is scored, the prepared model's reader holds only tensors under the cache limit.
    (Checked against the former reader, an unbounded cache of every decoded weight: it fails here.)"""
    monkeypatch.setattr(io, "CACHED_WEIGHT_BYTES", 64)  # the fixture's conv weights are all larger
    prepared = prepare(fixture_path("residual_add"))
    reader = prepared.weights()
    scoring = Scoring.for_prepared(prepared)
    large = {t.name for t in prepared.model.graph.initializer if io.tensor_nbytes(t) > 64}
    assert large
    for group in prepared.analysis.prunable_groups:
        assert np.all(np.isfinite(channel_scores(group, scoring, criterion, "domino-io")))
    assert not large & set(reader._cache)
    assert reader.cached_bytes <= 64 * len(reader._cache)


def test_filter_sets_decode_each_weight_once_and_ranks_from_dims():
    """Choosing a layer's weight among its members (the highest rank) reads dims, not values: each member's
    tensor is decoded at most once per call.  (Checked against the former `max(members, key=ndim of the
    decoded weight)`: it decoded every weight twice and fails here.)"""
    prepared = prepare(fixture_path("residual_add"))
    for group in prepared.analysis.prunable_groups:
        reader = CountingReader(prepared.model)
        sets = filter_sets(group, reader, ("producer", "carrier", "consumer"))
        assert sets
        assert len(reader.decoded) == len(set(reader.decoded))
        reader.decoded.clear()
        removed_weights(group, reader)
        assert reader.decoded == []  # counts of weights come from dims alone


def _with_unknown_fields(model):
    """`model` with a field no onnx version defines, on the model and on its graph (a newer exporter's)."""
    import onnx

    extra = bytes([0xF8, 0x07, 0x01])  # field 127, varint 1
    graph = model.graph.SerializeToString() + extra
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    tag = bytes([0x3A])  # field 7 (graph), length-delimited
    length = bytearray()
    n = len(graph)
    while n > 0x7F:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return onnx.ModelProto.FromString(head.SerializeToString() + tag + bytes(length) + graph + extra)


def test_fields_unknown_to_onnx_survive_normalising_pruning_and_saving(tmp_path):
    """The weightless copies (normalisation, the rewrite, the contracts' check, saving part by part) keep what a
    whole copy kept: fields this onnx does not know, on the model and on its graph."""
    import onnx

    import onnx_prune

    model = _with_unknown_fields(onnx.load(str(fixture_path("se"))))
    pruned, _ = onnx_prune.prune(model, ratio=0.5, progress=False)
    assert pruned.SerializeToString().count(bytes([0xF8, 0x07, 0x01])) == 2
    out = onnx_prune.save(pruned, tmp_path / "out.onnx")
    assert out.read_bytes() == pruned.SerializeToString()
