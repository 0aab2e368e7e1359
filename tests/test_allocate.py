"""Allocation: kept counts, rounding, ties, exclusions."""
import numpy as np
import pytest

import onnx_prune
from onnx_prune.passes.allocate import kept_count, select_top
from onnx_prune.pipeline import prepare

from conftest import fixture_path


@pytest.mark.parametrize("size, ratio, round_to, frozen, expected", [
    (10, 0.3, 1, 0, 7), (64, 0.5, 1, 0, 32), (64, 0.3, 8, 0, 48), (10, 0.3, 8, 0, 8),
    (4, 0.9, 8, 0, 4), (16, 0.99, 1, 0, 1), (16, 0.99, 4, 0, 4), (16, 0.5, 1, 12, 12), (7, 0.0, 1, 0, 7),
])
def test_kept_count(size, ratio, round_to, frozen, expected):
    assert kept_count(size, ratio, round_to, frozen) == expected


def test_select_top_keeps_frozen_and_best_and_breaks_ties_by_index():
    scores = np.array([5.0, 1.0, 1.0, 9.0, 0.0])
    frozen = np.array([False, False, False, False, True])
    assert list(select_top(scores, frozen, 3)) == [0, 3, 4]
    assert list(select_top(scores, frozen, 4)) == [0, 1, 3, 4]


def test_exclude_keeps_the_matching_groups_whole():
    prepared = prepare(fixture_path("concat"))
    _, report = onnx_prune.prune(prepared, ratio=0.5, exclude=["conv1", "conv2*"])
    kept = {g.name: (g.kept, g.size) for g in report.groups}
    assert kept["conv1"] == (4, 4) and kept["conv2"] == (6, 6) and kept["conv0"][0] < kept["conv0"][1]


def test_protect_first_keeps_the_stem():
    _, report = onnx_prune.prune(fixture_path("concat"), ratio=0.5, protect_first=True)
    stem = next(g for g in report.groups if g.name == "conv0")
    assert stem.kept == stem.size


def test_global_allocation_respects_max_ratio_and_never_empties():
    prepared = prepare(fixture_path("residual_add"))
    _, report = onnx_prune.prune(prepared, ratio=0.6, allocation="global", max_ratio=0.5)
    for g in report.groups:
        if g.size - g.frozen > 0:
            assert g.kept >= g.size - int(0.5 * g.size) and g.kept >= 1
    total = sum(g.size for g in report.groups if g.size - g.frozen > 0)
    kept = sum(g.kept for g in report.groups if g.size - g.frozen > 0)
    assert kept < total


def test_global_differs_from_uniform():
    _, uniform = onnx_prune.prune(fixture_path("concat"), ratio=0.4)
    _, global_ = onnx_prune.prune(fixture_path("concat"), ratio=0.4, allocation="global")
    assert [g.kept for g in uniform.groups] != [g.kept for g in global_.groups]


@pytest.mark.parametrize("kwargs, words", [
    (dict(ratio=0.3, target_macs=0.5), "give one target"),
    (dict(target_macs=1.5), "fraction to keep"),
    (dict(max_ratio=0.0), "--max-ratio"),
    (dict(criterion="apoz"), "needs calibration data"),
    (dict(aggregate="sum"), "unknown aggregation"),
])
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(onnx_prune.PruneError, match=words):
        onnx_prune.prune(fixture_path("se"), **kwargs)
