"""The latency model: curve fit, prediction, fastest widths, latency-targeted allocation, cache keys.

No assertion here depends on a clock: the tables are synthetic, except one that checks a measured table's
structure (which layers, which widths) on a fixture."""
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.errors import PruneError
from onnx_prune.runtime import latency_model as lm
from onnx_prune.runtime.latency_model import (
    GroupChoice,
    LatencyModel,
    alignment,
    cache_key,
    cache_path,
    calibrate,
    fit_curve,
    latency_counts,
    load_or_measure,
    model_hash,
    unit_for,
    widths_to_measure,
)

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
PENALTY = {1: 1.6, 2: 1.4, 4: 1.25, 8: 1.1, 16: 1.05}


def synthetic_ms(width, unit, slope=0.01, offset=0.05):
    """A kernel that is linear in the width and slower at widths the vector block does not divide."""
    return (offset + slope * width) * PENALTY.get(alignment(width, unit), 1.0)


def test_units_and_measured_widths():
    assert [unit_for(c) for c in (3, 8, 16, 32, 64, 128, 2048)] == [1, 2, 4, 8, 16, 32, 32]
    assert [alignment(w, 32) for w in (1, 6, 12, 40, 48, 64, 96)] == [1, 2, 4, 8, 16, 32, 32]
    widths = widths_to_measure(256)
    assert widths[-1] == 256 and widths[0] == 32
    aligned = [w for w in widths if w % 32 == 0]
    assert len(aligned) <= lm.GRID_POINTS + 1
    assert [w - 128 for w in widths if w % 32] == [1, 2, 4, 8, 16]  # probes next to the middle multiple
    assert widths_to_measure(3) == [1, 2, 3]  # narrow layers: every width


def test_fit_recovers_a_piecewise_linear_kernel_with_alignment_steps():
    full = 256
    widths = widths_to_measure(full)
    unit = unit_for(full)
    curve = fit_curve(full, widths, [synthetic_ms(w, unit) for w in widths])
    assert curve.unit == 32
    assert curve.penalty == pytest.approx(PENALTY)
    for width in range(1, full + 1):  # also every width that was never measured
        if width >= curve.base_widths[0]:
            assert curve.ms(width) == pytest.approx(synthetic_ms(width, unit), rel=1e-9)
    assert curve.ratio(full) == 1.0
    # deterministic: the same numbers give the same curve
    assert fit_curve(full, widths, [synthetic_ms(w, unit) for w in widths]) == curve


def test_fit_without_probes_has_no_penalty_and_extrapolates_proportionally():
    curve = fit_curve(64, [16, 32, 64], [1.0, 2.0, 4.0])
    assert curve.penalty == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}
    assert curve.ms(8) == pytest.approx(0.5)
    assert curve.ms(48) == pytest.approx(3.0)


def _layer(full, terms, kind="dense", axis="out", offset=0.05, slope=0.01):
    widths = widths_to_measure(full)
    unit = unit_for(full)
    entry = {"op": "Conv", "kind": kind, axis: {"full": full, "widths": widths,
                                                "ms": [synthetic_ms(w, unit, slope, offset) for w in widths],
                                                "terms": terms}}
    entry["full_ms"] = synthetic_ms(full, unit, slope, offset)
    return entry


def _terms(full, *groups):
    return {"full": full, "const": 0, "groups": {str(g): [full, full] for g in groups}}


def stub_table(fixed=1.0, scale=1.0):
    """Three layers: a -> b (group 0 out), b -> c (group 0 in, group 1 out), a depthwise one on group 1."""
    nodes = {
        "conv_a": _layer(64, _terms(64, 0)),
        "conv_b": dict(_layer(64, _terms(64, 1)), **{"in": _layer(64, _terms(64, 0), axis="in")["in"]}),
        "dw": _layer(64, _terms(64, 1), kind="same", slope=0.002),
    }
    nodes["conv_b"]["full_ms"] = synthetic_ms(64, 16)
    return {"version": lm.TABLE_VERSION, "nodes": nodes,
            "calibration": {"fixed_ms": fixed, "scale": scale,
                            "points": [{"share": 1.0, "counts": {}, "measured_ms": 0.0, "layers_ms": 0.0}]}}


def test_predict_sums_layers_with_dense_layers_scaling_in_both_widths():
    model = LatencyModel(stub_table(fixed=1.0, scale=2.0))
    full = model.predict({})
    layers = sum(entry["full_ms"] for entry in model.table["nodes"].values())
    assert full == pytest.approx(1.0 + 2.0 * layers)
    counts = {0: 32, 1: 48}
    a = synthetic_ms(32, 16)
    b = synthetic_ms(64, 16) * (synthetic_ms(48, 16) / synthetic_ms(64, 16)) * (synthetic_ms(32, 16) / synthetic_ms(64, 16))
    dw = synthetic_ms(48, 16, 0.002)
    assert model.predict(counts) == pytest.approx(1.0 + 2.0 * (a + b + dw))
    assert model.predict({0: 64, 1: 64}) == pytest.approx(full)  # absent groups are whole
    assert model.by_group == {0: ["conv_a", "conv_b"], 1: ["conv_b", "dw"]}
    # JSON round trip keeps every prediction
    again = LatencyModel.from_json(model.to_json())
    assert again.predict(counts) == model.predict(counts)


def test_fastest_width_prefers_aligned_counts_and_never_exceeds_the_cap():
    model = LatencyModel(stub_table())
    assert model.fastest_width(0, at_most=63, near=63) == 48  # 63..49 misaligned, 48 divisible by the unit
    assert model.fastest_width(0, at_most=64, near=64) == 64
    for cap in range(2, 65):
        width = model.fastest_width(1, at_most=cap, near=cap)
        assert 1 <= width <= cap
        assert cap - width <= min(lm.WINDOW, max(1, cap // 4))
    assert model.fastest_width(0, at_most=40, near=40, at_least=39) in (39, 40)
    assert model.fastest_width(7, at_most=13, near=13) == 13  # a group no timed layer depends on


def test_latency_counts_meet_the_target_and_spend_low_scores_first():
    model = LatencyModel(stub_table(fixed=0.5))
    rng = np.random.default_rng(0)
    important = np.abs(rng.standard_normal(64)) + 10.0  # group 0: every channel matters a lot
    cheap = np.abs(rng.standard_normal(64)) * 0.01 + 0.01  # group 1: channels matter little
    groups = {0: GroupChoice(64, 1, lm.normalise_scores(important) * 100.0),
              1: GroupChoice(64, 1, lm.normalise_scores(cheap))}
    full = model.predict({})
    for fraction in (0.9, 0.7, 0.5):
        for round_to in ("auto", 1, 8):
            target = fraction * full
            counts = latency_counts(model, groups, target, round_to)
            assert model.predict(counts) <= target
            assert set(counts) == {0, 1}
            if round_to != "auto" and round_to > 1:
                assert all(k % round_to == 0 for k in counts.values())
            # the cheap group gives up channels first
            assert counts[1] <= counts[0]
    # deterministic given the table
    assert latency_counts(model, groups, 0.6 * full) == latency_counts(model, groups, 0.6 * full)


def test_latency_counts_respect_floors_and_frozen_channels():
    model = LatencyModel(stub_table(fixed=0.5))
    frozen = np.zeros(64, dtype=bool)
    frozen[:20] = True
    groups = {0: GroupChoice(64, 40, np.ones(64)), 1: GroupChoice(64, 20, np.ones(64), frozen)}
    counts = latency_counts(model, groups, 0.0)  # unreachable: shrink to the floors and stop
    assert counts[0] >= 40 and counts[1] >= 20
    assert model.predict(counts) > 0.0


def test_auto_rounding_beats_plain_steps_when_misaligned_widths_are_slow():
    model = LatencyModel(stub_table(fixed=0.5))
    groups = {g: GroupChoice(64, 1, np.linspace(1, 2, 64)) for g in (0, 1)}
    target = 0.6 * model.predict({})
    auto = latency_counts(model, groups, target, "auto")
    plain = latency_counts(model, groups, target, 1)
    assert all(alignment(k, 16) >= 8 for k in auto.values())
    assert sum(auto.values()) >= sum(plain.values())  # the same time keeps at least as many channels


def test_calibration_goes_through_both_points_or_falls_back_to_a_scale():
    assert calibrate([{"measured_ms": 10.0, "layers_ms": 8.0}, {"measured_ms": 6.0, "layers_ms": 4.0}]) == \
        {"fixed_ms": pytest.approx(2.0), "scale": pytest.approx(1.0)}
    # a slimmed model measured slower (noise): no negative scale, the first point alone
    assert calibrate([{"measured_ms": 10.0, "layers_ms": 5.0}, {"measured_ms": 11.0, "layers_ms": 4.0}]) == \
        {"fixed_ms": 0.0, "scale": pytest.approx(2.0)}


def test_cache_key_names_everything_a_table_depends_on(monkeypatch, tmp_path):
    key = cache_key("abc", "cpu", 2, 8)
    assert key["provider"] == "CPUExecutionProvider" and key["threads"] == 2 and key["batch"] == 8
    assert key["onnxruntime"] == lm.ort.__version__ and key["model_sha256"] == "abc"
    variants = [cache_key("abd", "cpu", 2, 8), cache_key("abc", "cuda", 2, 8), cache_key("abc", "cpu", 1, 8),
                cache_key("abc", "cpu", 2, 1), cache_key("abc", "cpu", 2, 8, {"x": [1, 3, 32, 32]})]
    paths = {cache_path(k) for k in [key, *variants]}
    assert len(paths) == 6
    monkeypatch.setattr(lm.ort, "__version__", "0.0.0")
    assert cache_path(cache_key("abc", "cpu", 2, 8)) != cache_path(key)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path(key).parent == tmp_path / "onnx-prune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path(key).parent == tmp_path / "home" / ".cache" / "onnx-prune"


def test_model_hash_follows_weights_and_structure():
    model = onnx.load(FIXTURES / "residual_add.onnx")
    same = onnx.load(FIXTURES / "residual_add.onnx")
    assert model_hash(model) == model_hash(same)
    changed = onnx.load(FIXTURES / "residual_add.onnx")
    tensor = changed.graph.initializer[0]
    array = onnx.numpy_helper.to_array(tensor).copy()
    array.flat[0] += 1.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    assert model_hash(changed) != model_hash(model)


def test_cached_and_given_tables_are_read_back_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = onnx_prune.prepare(FIXTURES / "residual_add.onnx")

    def no_timing(*args, **kwargs):
        raise AssertionError("measured although a table was there")

    table = stub_table()
    key = cache_key(model_hash(prepared.model), "cpu", 1, 1)
    table["key"] = key
    cache_path(key).parent.mkdir(parents=True)
    cache_path(key).write_text(json.dumps(table))
    monkeypatch.setattr(lm, "measure_table", no_timing)
    loaded = load_or_measure(prepared.model, prepared.analysis, "cpu", 1, 1)
    assert loaded.table == table
    # a user's file is written from the cache and read back on the next run
    given = tmp_path / "table.json"
    load_or_measure(prepared.model, prepared.analysis, "cpu", 1, 1, table_file=given)
    assert json.loads(given.read_text()) == table
    assert load_or_measure(prepared.model, prepared.analysis, "cpu", 1, 1, table_file=given,
                           use_cache=False).table == table
    # ... but not for other settings or another model
    with pytest.raises(PruneError, match="other settings: batch 1 \\(now 8\\)"):
        load_or_measure(prepared.model, prepared.analysis, "cpu", 1, 8, table_file=given)
    other = onnx_prune.prepare(FIXTURES / "concat.onnx")
    with pytest.raises(PruneError, match="another model"):
        load_or_measure(other.model, other.analysis, "cpu", 1, 1, table_file=given)


def test_measured_table_covers_every_layer_a_group_changes(monkeypatch, tmp_path):
    """Structure only (no timing value is asserted): which layers and widths were measured, JSON-able."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = onnx_prune.prepare(FIXTURES / "residual_add.onnx")
    table = lm.measure_table(prepared.model, prepared.analysis, "cpu", threads=1, batch=1, repeat=1,
                             whole_repeat=1)
    convs = {n.name for n in prepared.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    changed = {m.node for g in prepared.analysis.prunable_groups for m in g.members}
    assert set(table["nodes"]) == convs & changed
    for name, entry in table["nodes"].items():
        assert entry["full_ms"] >= 0
        for axis in ("out", "in"):
            if axis in entry:
                assert entry[axis]["widths"] == widths_to_measure(entry[axis]["full"])
                assert len(entry[axis]["ms"]) == len(entry[axis]["widths"])
    model = LatencyModel(json.loads(json.dumps(table)))
    assert [p["share"] for p in table["calibration"]["points"]] == [1.0, 0.6]
    assert math.isfinite(model.predict({g.id: 1 for g in prepared.analysis.prunable_groups}))
