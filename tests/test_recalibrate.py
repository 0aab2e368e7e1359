"""Recalibration with --calib: each layer's output channels get back the original's mean and spread."""
import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.recalibrate import (ChannelMoments, RecalibratePass, affine_correction, channel_map,
                                           output_moments, up_to)
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare

from test_sensitivity import two_group_model


def _feeds(count=6, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0.5, 1.0, (2, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def _group(prepared, name):
    return next(g for g in prepared.analysis.groups if g.name == name)


def test_the_pruned_layers_outputs_get_the_originals_statistics_back():
    prepared = prepare(two_group_model())
    a = _group(prepared, "convA")
    keep = np.array([1, 3, 5, 7])  # the live channels of A stay; B's inputs lose the 4 constant ones
    plan = Plan({a.id: GroupPlan(keep)})  # no compensation: B's outputs move
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    mapping = channel_map(prepared.model, prepared.analysis, plan)
    assert mapping["convA"].tolist() == keep.tolist() and mapping["convB"].tolist() == list(range(8))
    feeds = _feeds()
    result = RecalibratePass(prepared.model, mapping, feeds)(pruned)
    assert result.modified and result.details["recalibrated"] == 2
    assert result.details["held_out_damage_after"] < result.details["held_out_damage_before"]
    onnx.checker.check_model(result.model, full_check=True)
    fit = feeds[:-1]  # what the pass fitted on (the last feed is held out)
    original = output_moments(prepared.model, ["cb"], fit)["cb"]
    before = output_moments(pruned, ["cb"], fit)["cb"]
    after = output_moments(result.model, ["cb"], fit)["cb"]
    assert np.abs(before.mean - original.mean).max() > 0.5  # the removed constants shifted B's outputs
    np.testing.assert_allclose(after.mean, original.mean, atol=1e-3)
    np.testing.assert_allclose(after.std, original.std, rtol=1e-3)


def test_a_correction_that_does_not_lower_the_held_out_damage_is_refused():
    prepared = prepare(two_group_model())
    b = _group(prepared, "convB")
    plan = Plan({b.id: GroupPlan(np.array([0, 1, 2, 3]))})  # only the classifier loses inputs
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    mapping = channel_map(prepared.model, prepared.analysis, plan)
    # every corrected layer computes what it did (the kept channels' inputs are whole): nothing to gain
    result = RecalibratePass(prepared.model, mapping, _feeds())(pruned)
    assert not result.modified and result.model is pruned
    assert "did not lower" in result.details["reason"]
    assert result.details["held_out_damage_before"] > 0


def test_affine_correction_matches_mean_and_spread_and_leaves_dead_channels_alone():
    target = ChannelMoments(np.array([1.0, -2.0, 3.0]), np.array([2.0, 0.5, 0.0]))
    current = ChannelMoments(np.array([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0]))
    scale, shift = affine_correction(target, current)
    assert scale.tolist() == [2.0, 0.5, 1.0]
    assert (scale * current.mean + shift).tolist() == target.mean.tolist()


def test_up_to_computes_only_what_the_tensor_needs():
    model = two_group_model()
    truncated = up_to(model, ["ra"])
    assert [n.name for n in truncated.graph.node] == ["convA", "bnA", "reluA"]
    assert [o.name for o in truncated.graph.output] == ["ra"]


def test_prune_with_calibration_recalibrates_and_plan_apply_matches(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(8)]))
    model = two_group_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    pruned, report = onnx_prune.prune(str(path), ratio=0.25, calib=str(calib), compensate=False,
                                      method="prune")
    assert "recalibration" in report.details and "held_out_damage_after" in report.details["recalibration"]
    plain, plain_report = onnx_prune.prune(str(path), ratio=0.25, calib=str(calib), compensate=False,
                                           recalibrate=False, method="prune")
    assert "recalibration" not in plain_report.details
    if report.details["recalibration"]["recalibrated"]:
        assert pruned.SerializeToString() != plain.SerializeToString()
    from onnx_prune.pipeline import apply_plan, plan_file

    applied, _ = apply_plan(str(path), plan_file(str(path), ratio=0.25, calib=str(calib), compensate=False))
    assert applied.SerializeToString() == pruned.SerializeToString()
