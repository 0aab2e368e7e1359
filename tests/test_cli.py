"""The command line as a user meets it: results, reports, and one-line errors with no output file."""
import json
import shutil

import onnx
import pytest

from onnx_prune.cli import main

from conftest import fixture_path
from invariants import conv_chain


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_a_valid_smaller_model_and_report(tmp_path, capsys):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    code, out_text, err = _run(capsys, fixture_path("residual_add"), out, "--ratio", "0.5", "--round-to", "2",
                        "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["macs_after"] < data["macs_before"]
    assert data["options"]["round_to"] == 2 and "onnxruntime" in data["versions"]
    assert all(g["kept"] % 2 == 0 or g["kept"] == g["size"] for g in data["groups"])
    assert data["validation"]["fidelity"]["samples"] == 4 and data["validation"]["synthetic"]
    assert "max abs err" in out_text and "generated random inputs" in err  # results on stdout, notices on stderr


def test_analyze_prints_a_table_and_json(capsys):
    code, out, _ = _run(capsys, "analyze", fixture_path("unknown_op"))
    assert code == 0 and "LRN node 'lrn0' is not understood" in out
    code, out, _ = _run(capsys, "analyze", fixture_path("unknown_op"), "--json")
    data = json.loads(out)
    assert code == 0 and any(g["reasons"] for g in data["groups"]) and data["macs"] > 0


def test_bench_two_models(tmp_path, capsys):
    pruned = tmp_path / "p.onnx"
    assert main([str(fixture_path("se")), str(pruned), "--quiet"]) == 0
    code, out, _ = _run(capsys, "bench", fixture_path("se"), pruned, "--batch", "1,2", "--repeat", "3",
                        "--warmup", "1")
    assert code == 0 and "speed-up" in out


def _conv_to_output(path):
    """x -> Conv -> graph output: every channel is an output channel, so nothing can be pruned."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("make_input, args, words", [
    (lambda d: d / "missing.onnx", [], "no such file"),
    (lambda d: (d / "junk.onnx").write_bytes(b"\x00not a model at all") and d / "junk.onnx", [], "not an ONNX model"),
    (lambda d: fixture_path("se"), ["--ratio", "1.0"], "--ratio must be in [0, 1)"),
    (lambda d: fixture_path("se"), ["--ratio", "-0.1"], "--ratio must be in [0, 1)"),
    (lambda d: fixture_path("se"), ["--exclude", "no_such_node"], "no node of the model has that name"),
    (lambda d: _conv_to_output(d / "head_only.onnx"), [], "nothing to prune"),
])
def test_bad_input_is_one_line_error_without_output(tmp_path, capsys, make_input, args, words):
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, make_input(tmp_path), out, *args)
    assert code == 1
    assert words in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists() and not list(tmp_path.glob(".onnx-prune-*"))


def _undefined_weight(model):
    model.graph.node[0].input[1] = "undefined_weight"


def _old_opset(model):
    model.opset_import[0].version = 9


@pytest.mark.parametrize("spoil, words", [(_undefined_weight, "not a valid ONNX model"), (_old_opset, "opset 9")])
def test_unusable_model_is_refused(tmp_path, capsys, spoil, words):
    model = onnx.load(str(fixture_path("se")))
    spoil(model)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = _run(capsys, bad, tmp_path / "out.onnx")
    assert code == 1 and words in err


def test_refuses_to_overwrite_the_input(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    shutil.copy(fixture_path("se"), model)
    before = model.read_bytes()
    code, _, err = _run(capsys, model, model)
    assert code == 1 and "refusing to overwrite the input" in err
    assert model.read_bytes() == before


def test_external_data_input_gives_external_data_output(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code, _, err = _run(capsys, fixture_path("external_data"), out, "--no-validate")
    assert code == 0, err
    assert (tmp_path / "small.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)


def test_same_options_give_identical_files(tmp_path, capsys):
    for name in ("a.onnx", "b.onnx"):
        assert main([str(fixture_path("channel_shuffle")), str(tmp_path / name), "--seed", "7", "--quiet"]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_validation_on_user_inputs(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((3, 2, 3, 8, 8)).astype(np.float32))
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, fixture_path("se"), tmp_path / "o.onnx", "--inputs", data, "--report", report)
    assert code == 0, err
    assert "6 samples from inputs.npz" in err  # 3 feeds of batch 2
    assert json.loads(report.read_text())["validation"]["samples"] == 6


def test_plan_then_apply_equals_prune(tmp_path, capsys):
    plan, direct, applied = tmp_path / "plan.json", tmp_path / "direct.onnx", tmp_path / "applied.onnx"
    assert main([str(fixture_path("concat")), str(direct), "--ratio", "0.5", "--quiet"]) == 0
    code, _, err = _run(capsys, "plan", fixture_path("concat"), plan, "--ratio", "0.5")
    assert code == 0, err
    code, _, err = _run(capsys, "apply", fixture_path("concat"), plan, applied, "--quiet")
    assert code == 0, err
    assert direct.read_bytes() == applied.read_bytes()
    # an edited plan that removes a channel of the wrong model or a frozen one is refused
    data = json.loads(plan.read_text())
    first = next(iter(data["groups"]))
    data["groups"][first]["size"] += 1
    plan.write_text(json.dumps(data))
    code, _, err = _run(capsys, "apply", fixture_path("concat"), plan, tmp_path / "x.onnx")
    assert code == 1 and "does not match this model" in err and not (tmp_path / "x.onnx").exists()


def test_centripetal_with_repair_from_the_command_line(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 4, 3, 8, 8)).astype(np.float32))
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, fixture_path("residual_add"), tmp_path / "o.onnx", "--method", "centripetal",
                        "--target-macs", "0.6", "--repair", "--calib", data, "--report", report)
    assert code == 0, err
    details = json.loads(report.read_text())["details"]
    assert details["clusters"] and details["repair"]["layers"]
    code, _, err = _run(capsys, fixture_path("residual_add"), tmp_path / "p.onnx", "--repair")
    assert code == 1 and "give --calib" in err


@pytest.mark.parametrize("args, key", [(["--method", "red", "--target-macs", "0.7"], "merge"),
                                       (["--method", "hash"], "HashWeightsPass")])
def test_red_and_hash_from_the_command_line(tmp_path, capsys, args, key):
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, fixture_path("se"), tmp_path / "o.onnx", *args, "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["details"][key]
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    if "--target-macs" in args:
        assert data["macs_after"] <= 0.71 * data["macs_before"]


def test_blend_search_then_reapply_saved_weights(tmp_path, capsys):
    first, again, weights = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "blend.json"
    common = ["--criterion", "blend", "--target-macs", "0.6", "--generations", "2", "--population", "5",
              "--no-validate"]
    code, _, err = _run(capsys, fixture_path("residual_add"), first, *common, "--blend-report", weights)
    assert code == 0, err
    saved = json.loads(weights.read_text())
    assert saved["weights"] and saved["clusters"]
    code, _, err = _run(capsys, fixture_path("residual_add"), again, *common, "--blend-weights", weights)
    assert code == 0, err
    assert first.read_bytes() == again.read_bytes()


def test_analyze_shows_criteria_clusters(capsys):
    code, out, _ = _run(capsys, "analyze", fixture_path("depthwise"), "--criteria-clusters")
    assert code == 0 and "cluster" in out.lower()


def test_repair_with_too_little_calibration_data_is_a_clear_error(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "one.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    code, _, err = _run(capsys, fixture_path("residual_add"), tmp_path / "o.onnx", "--repair", "--calib", data)
    assert code == 1 and "--repair:" in err and "Traceback" not in err


def _conv_chain(path, width: int, hw=(32, 32)):
    """The same signature at any width (dynamic batch), so a wide one does the same job with many more MACs (a
    deliberately slower "result")."""
    return conv_chain(path, width, "N", hw)


def _speed_check(tmp_path, capsys, original_width: int, result_width: int, **options):
    """The CLI's never-slower check (cli._speed_gate): an `original_width`-wide chain against a `result_width`-wide
    one as the "result"."""
    import argparse

    import onnx_prune
    from onnx_prune.cli import Console, _speed_gate
    from onnx_prune.options import PruneOptions

    prepared = onnx_prune.prepare(str(_conv_chain(tmp_path / "original.onnx", original_width)))
    result = onnx.load(str(_conv_chain(tmp_path / "result.onnx", result_width)))
    args = argparse.Namespace(shape=[], no_speed_check=False)
    record, failures = _speed_gate(args, PruneOptions(threads=1, **options), prepared, result, Console())
    return record, failures, capsys.readouterr()


def test_speed_check_warns_loudly_when_the_result_is_slower(tmp_path, capsys):
    record, failures, (out, err) = _speed_check(tmp_path, capsys, original_width=4, result_width=256)
    assert record["measured"] and record["speedup"] < 0.5 and record["runs"] >= 3
    assert failures == []  # a warning, not a failure
    assert "WARNING: the pruned model is SLOWER than the original" in err and "speed-up" in out


def test_speed_check_is_quiet_when_the_result_is_faster(tmp_path, capsys):
    record, failures, (_, err) = _speed_check(tmp_path, capsys, original_width=256, result_width=4)
    assert record["speedup"] > 2 and failures == [] and "WARNING" not in err


def test_speed_check_below_min_speedup_is_a_gate_failure(tmp_path, capsys):
    record, failures, (_, err) = _speed_check(tmp_path, capsys, original_width=4, result_width=256,
                                              min_speedup=1.0)
    assert record["speedup"] < 1 and failures and "below --min-speedup 1" in failures[0]


def test_min_speedup_fails_with_exit_4_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = _run(capsys, fixture_path("residual_add"), out, "--min-speedup", "1000", "--threads", "1")
    assert code == 4 and "--min-speedup 1000" in err and "nothing written" in err and not out.exists()


def test_prune_times_the_result_by_default_and_not_with_no_speed_check(tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, fixture_path("se"), tmp_path / "a.onnx", "--report", report, "--threads", "1")
    assert code == 0, err
    speed = json.loads(report.read_text())["speed"]
    assert speed["measured"] and speed["runs"] >= 3 and speed["original_ms"] > 0 and "speed-up" in out
    assert "rounding (--round-to size): multiples of 8" in out  # the default rule, in words
    code, out, err = _run(capsys, fixture_path("se"), tmp_path / "b.onnx", "--report", report, "--no-speed-check")
    assert code == 0, err
    assert "speed" not in json.loads(report.read_text()) and "timing" not in err


def test_dynamic_shapes_without_shape_are_not_timed_but_still_pruned(tmp_path, capsys):
    model = _conv_chain(tmp_path / "dynamic.onnx", 16, hw=("H", "W"))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _run(capsys, model, out, "--ratio", "0.5", "--no-validate", "--report", report)
    assert code == 0, err
    assert "speed not measured" in err and "--shape" in err and "Traceback" not in err
    assert out.exists() and json.loads(report.read_text())["speed"]["measured"] is False
    # --min-speedup needs the figure: a one-line error, nothing written
    code, _, err = _run(capsys, model, tmp_path / "p.onnx", "--ratio", "0.5", "--no-validate", "--min-speedup", "1")
    assert code == 1 and "--min-speedup: cannot time the models" in err and not (tmp_path / "p.onnx").exists()


def test_big_originals_are_not_timed_by_default_but_min_speedup_still_times_them(tmp_path, capsys, monkeypatch):
    import onnx_prune.cli as cli

    monkeypatch.setattr(cli, "SPEED_CHECK_MAX_BYTES", 0)  # every model is "big"
    record, failures, (_, err) = _speed_check(tmp_path, capsys, original_width=4, result_width=256)
    assert record == {"measured": False, "reason": record["reason"]} and "MiB of weights" in record["reason"]
    assert failures == [] and "speed not measured" in err and "WARNING" not in err
    record, failures, _ = _speed_check(tmp_path, capsys, original_width=4, result_width=256, min_speedup=1.0)
    assert record["measured"] and failures
