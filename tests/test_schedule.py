"""The defaults that adapt: `--allocation auto` (sensitivity when affordable), `--method auto` (obs with
--calib data), and `--steps`."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_prune
from invariants import feeds_for, run
from onnx_prune.errors import PruneError
from onnx_prune.passes import sensitivity
from onnx_prune.pipeline import plan_file, step_shares
from onnx_prune.runtime.cost import count_cost
from test_sensitivity import two_group_model

TRAINED_MOBILENET = Path(__file__).resolve().parents[1] / "models" / "trained" / "mobilenet_v2.onnx"



def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def test_auto_without_data_is_sensitivity_when_affordable():
    model = two_group_model()
    # (max_ratio 0.5 replaces the hedge on synthetic-image curves, which in 8-channel groups allows 2 channels)
    auto, report = onnx_prune.prune(model, target_macs=0.6, max_ratio=0.5, progress=False)
    measured, _ = onnx_prune.prune(model, target_macs=0.6, allocation="sensitivity", max_ratio=0.5, progress=False)
    uniform, uniform_report = onnx_prune.prune(model, target_macs=0.6, allocation="uniform", max_ratio=0.5,
                                               progress=False)
    assert report.details["allocation"]["used"] == "sensitivity"
    assert "sensitivity" in report.details and report.details["sensitivity"]["inputs"] == "synthetic"
    assert _bytes(auto) == _bytes(measured)
    assert "allocation: auto without data: sensitivity on synthetic images" in report.summary()
    # A's constant channels go (no damage once compensated), B keeps all it has; uniform takes from both
    assert {g.name: g.kept for g in report.groups}["convB"] == 8
    assert {g.name: g.kept for g in uniform_report.groups}["convB"] < 8


def test_auto_without_data_is_uniform_for_a_share_of_channels():
    model = two_group_model()
    auto, report = onnx_prune.prune(model, ratio=0.25, progress=False)
    uniform, _ = onnx_prune.prune(model, ratio=0.25, allocation="uniform", progress=False)
    assert "sensitivity" not in report.details and _bytes(auto) == _bytes(uniform)


def test_auto_without_data_is_uniform_over_the_budget(monkeypatch):
    model = two_group_model()
    monkeypatch.setattr(sensitivity, "AUTO_BUDGET_MACS", 1.0)
    auto, report = onnx_prune.prune(model, target_macs=0.6, progress=False)
    uniform, _ = onnx_prune.prune(model, target_macs=0.6, allocation="uniform", progress=False)
    assert report.details["allocation"]["used"] == "uniform"
    assert "TMAC" in report.details["allocation"]["why"] and "sensitivity" not in report.details
    assert _bytes(auto) == _bytes(uniform)


def test_auto_without_data_is_uniform_when_input_dims_are_open():
    model = two_group_model()
    cost = count_cost(model)
    assert sensitivity.affordable(model, 2, cost)[0] == "sensitivity"
    dim = model.graph.input[0].type.tensor_type.shape.dim[2]
    dim.ClearField("dim_value")
    dim.dim_param = "height"  # nothing to synthesise an input from
    used, why = sensitivity.affordable(model, 2, cost)
    assert used == "uniform" and "no synthetic inputs" in why and "height" in why
    assert sensitivity.affordable(two_group_model(), 2, None)[0] == "uniform"  # MACs not counted


def test_step_shares_are_evenly_spaced_down_to_the_target():
    assert np.allclose(step_shares(0.67, 3), [0.89, 0.78, 0.67])
    assert step_shares(0.5, 1) == [0.5]


def test_steps_reach_the_target_of_the_original_and_record_each_step():
    path = str(TRAINED_MOBILENET)
    original = onnx.load(path)
    pruned, report = onnx_prune.prune(path, target_macs=0.7, steps=2, allocation="uniform", progress=False)
    one, one_report = onnx_prune.prune(path, target_macs=0.7, allocation="uniform", progress=False)
    onnx.checker.check_model(pruned)
    assert report.macs_before == one_report.macs_before  # counted against the original, not the last step
    assert abs(report.macs_after / report.macs_before - 0.7) <= 0.01
    assert report.details["target"]["achieved"] == pytest.approx(report.macs_after / report.macs_before)
    steps = report.details["steps"]
    assert [s["keep"] for s in steps] == pytest.approx([0.85, 0.7])
    assert steps[0]["macs_after"] > steps[1]["macs_after"] == report.macs_after
    assert "steps: 85% -> 70% of the original's MACs" in report.summary()
    feeds = feeds_for(original)
    assert [o.shape for o in run(pruned, feeds)] == [o.shape for o in run(original, feeds)]
    assert _bytes(pruned) != _bytes(one)  # a different route: the second step re-scores the pruned model
    again, _ = onnx_prune.prune(path, target_macs=0.7, steps=2, allocation="uniform", progress=False)
    assert _bytes(again) == _bytes(pruned)


@pytest.mark.parametrize("options, message", [
    (dict(ratio=0.3, steps=2), "steps needs (--)?target.macs or (--)?target.params"),
    (dict(target_macs=0.7, steps=0), "steps must be a positive integer"),
])
def test_steps_refuse_what_they_cannot_do(options, message):
    with pytest.raises(PruneError, match=message):
        onnx_prune.prune(two_group_model(), progress=False, **options)


def test_a_plan_file_refuses_steps():
    with pytest.raises(PruneError, match="one plan cannot hold it"):
        plan_file(two_group_model(), target_macs=0.7, steps=2)


def test_cli_steps_prune_and_report_each_step(tmp_path, capsys):
    from onnx_prune.cli import main

    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(TRAINED_MOBILENET), str(out), "--target-macs", "0.8", "--steps", "2", "--allocation",
                 "uniform", "--no-speed-check", "--report", str(report)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and out.exists()
    assert "steps: 90% -> 80% of the original's MACs" in stdout
    import json

    details = json.loads(report.read_text())["details"]
    assert [round(s["keep"], 2) for s in details["steps"]] == [0.9, 0.8]
    assert main([str(TRAINED_MOBILENET), str(tmp_path / "x.onnx"), "--ratio", "0.3", "--steps", "2",
                 "--quiet"]) != 0
    assert not (tmp_path / "x.onnx").exists()


def _calibration(tmp_path, samples: int):
    path = tmp_path / f"calib{samples}.npz"
    np.savez(path, x=np.random.default_rng(3).normal(0, 1, (samples, 3, 16, 16)).astype(np.float32))
    return str(path)


def test_auto_method_is_obs_with_calibration_data(tmp_path):
    model, calib = two_group_model(), _calibration(tmp_path, 8)
    auto, report = onnx_prune.prune(model, target_macs=0.7, calib=calib, progress=False)
    obs, _ = onnx_prune.prune(model, target_macs=0.7, calib=calib, method="obs", progress=False)
    assert report.options["method"] == "obs" and report.details["method"]["auto"] == "obs"
    assert "obs" in report.details and "repair" in report.details  # selected and reconstructed
    assert _bytes(auto) == _bytes(obs)
    assert "method: auto -> obs" in report.summary()


def test_auto_method_selects_by_scores_when_asked_or_without_data(tmp_path):
    model, calib = two_group_model(), _calibration(tmp_path, 8)
    _, scored = onnx_prune.prune(model, target_macs=0.7, calib=calib, criterion="l1", progress=False)
    assert scored.options["method"] == "prune" and "obs" not in scored.details
    _, free = onnx_prune.prune(model, target_macs=0.7, progress=False)
    assert free.options["method"] == "prune" and "method: auto" not in free.summary()
    plan = plan_file(model, target_macs=0.7, calib=calib)  # a plan cannot hold obs's reconstruction
    assert '"method": "prune"' in plan


def test_auto_method_falls_back_to_prune_when_the_data_is_too_small_for_obs(tmp_path):
    model, calib = two_group_model(), _calibration(tmp_path, 2)  # one feed: nothing to hold out
    auto, report = onnx_prune.prune(model, target_macs=0.7, calib=calib, progress=False)
    pruned, _ = onnx_prune.prune(model, target_macs=0.7, calib=calib, method="prune", progress=False)
    assert report.options["method"] == "prune" and "obs refused" in report.details["method"]["why"]
    assert _bytes(auto) == _bytes(pruned)
    with pytest.raises(PruneError, match="obs.*prune works with less data"):
        onnx_prune.prune(model, target_macs=0.7, calib=calib, method="obs", progress=False)
