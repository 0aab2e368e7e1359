"""Criteria on hand-made weights with known rankings, Domino against the coupling-blind baseline, Nystrom."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_prune
from onnx_prune.analysis.criteria import (FilterSet, Scoring, channel_scores, fpgm, l1, l2, nearest_exact,
                                          nearest_nystrom, nystrom, prototypes, random_scores, similarity)
from onnx_prune.passes.similarity import SimilaritySelect
from onnx_prune.pipeline import prepare

from conftest import fixture_path
from invariants import feeds_for, relative_error, run


def _filters(rows, kernel=1):
    rows = np.asarray(rows, dtype=np.float64)
    n = len(rows)
    return FilterSet("conv", "producer", np.column_stack([rows, np.zeros(n)]), np.arange(n), np.arange(n), kernel)


def test_norms_rank_by_magnitude():
    filters = _filters([[1, -1, 0], [3, 0, 0], [1, 1, 1], [0, 0, 0.5]])
    assert list(np.argsort(l1(filters))) == [3, 0, 1, 2]
    assert list(np.argsort(l2(filters))) == [3, 0, 2, 1]


def test_fpgm_scores_the_filter_at_the_geometric_median_lowest():
    filters = _filters([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [0.1, 0.1]])
    assert int(np.argmin(fpgm(filters))) in (0, 5)
    assert fpgm(filters)[1] > fpgm(filters)[0]


def test_similarity_finds_the_near_duplicate():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 18))
    rows[4] = 2.5 * rows[1]  # same direction, other scale: a rank-1 twin
    score = similarity(_filters(rows, kernel=9))
    assert set(np.argsort(score)[:2]) == {1, 4}


def test_random_is_seeded():
    filters = _filters(np.ones((5, 3)))
    a = random_scores(filters, rng=np.random.default_rng(3))
    assert np.array_equal(a, random_scores(filters, rng=np.random.default_rng(3)))
    assert not np.array_equal(a, random_scores(filters, rng=np.random.default_rng(4)))


@pytest.mark.parametrize("n_filters", [1024, 2048])
def test_nystrom_equals_exact_when_landmarks_reach_the_rank(n_filters):
    rng = np.random.default_rng(n_filters)
    weights = rng.standard_normal((n_filters, 16, 3, 3))  # 3x3 kernels: prototypes of rank <= 9
    filters = _filters(weights.reshape(n_filters, -1), kernel=9)
    proto = prototypes(filters)
    exact_neighbour, exact_distance = nearest_exact(proto)
    approx_neighbour, approx_distance = nearest_nystrom(proto, landmarks=9)
    assert np.array_equal(exact_neighbour, approx_neighbour)
    assert np.allclose(exact_distance, approx_distance, atol=1e-8)
    assert np.allclose(similarity(filters), nystrom(filters, landmarks=9), atol=1e-8)
    # fewer landmarks than the rank is an approximation, and it shows
    assert not np.allclose(exact_distance, nearest_nystrom(proto, landmarks=3)[1], atol=1e-6)


def _set_weight(model, name, value):
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def test_domino_ranking_differs_from_the_coupling_blind_one():
    """residual_add: conv0 (stem) and conv2 (block output) are tied by the identity shortcut.  Channel 0 is
    the strongest in conv0 alone but nearly empty in conv2; Domino sees that channel 1 matters more overall."""
    model = prepare(fixture_path("residual_add")).model
    w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv0.weight")).copy()
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv2.weight")).copy()
    w0[:] = 0.01
    w2[:] = 0.01
    w0[0], w0[1] = 1.0, 0.5
    w2[0], w2[1] = 0.0, 2.0
    _set_weight(model, "conv0.weight", w0)
    _set_weight(model, "conv2.weight", w2)
    prepared = prepare(model)
    group = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    assert group.nodes("producer")[:2] == ["conv0", "conv2"]
    scoring = Scoring.of(prepared.model, prepared.weights())
    first = channel_scores(group, scoring, "l1", "first")
    domino = channel_scores(group, scoring, "l1", "domino-o")
    assert np.argmax(first) == 0 and np.argmax(domino) == 1
    io = channel_scores(group, scoring, "l1", "domino-io")
    assert np.all(io >= domino)
    normalized = channel_scores(group, scoring, "l1", "domino-o", normalize=True)
    assert np.allclose(normalized * (domino / np.where(normalized > 0, normalized, 1)), domino)


def test_bn_criterion_reads_gamma():
    prepared = prepare(fixture_path("se"))
    group = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    scoring = Scoring.of(prepared.model, prepared.weights())
    gamma = prepared.weights()("bn0.scale")
    assert np.array_equal(np.argsort(channel_scores(group, scoring, "bn")), np.argsort(np.abs(gamma)))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn", "random", "similarity", "nystrom"])
@pytest.mark.parametrize("aggregate", ["first", "domino-o", "domino-io", "mean", "max"])
def test_every_criterion_and_aggregation_prunes_a_valid_model(criterion, aggregate):
    model, report = onnx_prune.prune(fixture_path("depthwise"), ratio=0.5, criterion=criterion, aggregate=aggregate)
    onnx.checker.check_model(model, full_check=True)
    assert report.macs_after < report.macs_before


def test_similarity_method_with_compensation_merges_a_duplicate_exactly():
    prepared = prepare(fixture_path("flatten_gemm"))
    model = prepared.model
    w = prepared.weights()("conv0.weight").copy()
    b = prepared.weights()("conv0.bias").copy()
    w[3], b[3] = w[1], b[1]  # channel 3 duplicates channel 1
    _set_weight(model, "conv0.weight", w)
    _set_weight(model, "conv0.bias", b)
    duplicated = prepare(model)
    group = next(g for g in duplicated.analysis.groups if "conv0" in g.nodes("producer"))
    scoring = Scoring.of(duplicated.model, duplicated.weights())
    plan = SimilaritySelect(scoring, compensate=True)(group, group.size - 1)
    assert 3 not in plan.keep or 1 not in plan.keep
    pruned, _ = onnx_prune.prune(duplicated, ratio=0.25, method="similarity", compensate=True)
    feeds = feeds_for(duplicated.model)
    assert relative_error(run(duplicated.model, feeds), run(pruned, feeds)) < 1e-5
    plain, _ = onnx_prune.prune(duplicated, ratio=0.25, method="similarity")
    assert relative_error(run(duplicated.model, feeds), run(plain, feeds)) > 1e-3


def test_calibration_criteria_drop_a_dead_channel_first(tmp_path):
    prepared = prepare(fixture_path("concat"))
    model = prepared.model
    b = prepared.weights()("conv1.bias").copy()
    w = prepared.weights()("conv1.weight").copy()
    w[2], b[2] = 0.0, -1.0  # channel 2 of conv1 is always negative: Relu makes it 0
    _set_weight(model, "conv1.weight", w)
    _set_weight(model, "conv1.bias", b)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 1, 3, 8, 8)).astype(np.float32))
    for criterion in ("apoz", "activation"):
        _, report = onnx_prune.prune(model, ratio=0.25, criterion=criterion, calib=str(data))
        conv1 = next(g for g in report.groups if g.name == "conv1")
        assert conv1.kept == 3
        pruned_prepared = prepare(model)
        group = next(g for g in pruned_prepared.analysis.groups if g.name == "conv1")
        from onnx_prune.runtime.activations import calibration_scores
        from onnx_prune.runtime.fidelity import load_npz_inputs
        scores = calibration_scores(pruned_prepared.model, pruned_prepared.analysis, [group.id],
                                    load_npz_inputs(data, pruned_prepared.model), criterion)
        assert int(np.argmin(scores[group.id])) == 2
