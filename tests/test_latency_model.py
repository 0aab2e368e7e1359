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
from onnx_prune.passes.allocate import mean_normalised
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
    assert [unit_for(c) for c in (3, 8, 16, 32, 64, 128, 2048)] == [1, 4, 8, 16, 32, 32, 32]
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
    curve = fit_curve(64, [32, 64], [2.0, 4.0])
    assert curve.penalty == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}
    assert curve.ms(8) == pytest.approx(0.5)
    assert curve.ms(48) == pytest.approx(3.0)


def test_fit_takes_noise_out_of_the_base_and_the_penalties():
    # an aligned width measured faster than a narrower one, and a misaligned one measured faster than its base
    curve = fit_curve(128, [32, 64, 65, 96, 128], [1.0, 2.2, 1.5, 1.8, 4.0])
    assert list(curve.base_ms) == pytest.approx([1.0, 2.0, 2.0, 4.0])
    assert curve.penalty[1] == 1.0
    assert lm.monotone([3.0, 1.0, 2.0, 5.0]) == pytest.approx([2.0, 2.0, 2.0, 5.0])


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
    nodes["conv_b"]["full_ms"] = synthetic_ms(64, 32)
    return {"version": lm.TABLE_VERSION, "nodes": nodes,
            "calibration": {"fixed_ms": fixed, "scale": scale,
                            "points": [{"share": 1.0, "counts": {}, "measured_ms": 0.0, "layers_ms": 0.0}]}}


def test_predict_sums_layers_with_dense_layers_scaling_in_both_widths():
    model = LatencyModel(stub_table(fixed=1.0, scale=2.0))
    full = model.predict({})
    layers = sum(entry["full_ms"] for entry in model.table["nodes"].values())
    assert full == pytest.approx(1.0 + 2.0 * layers)
    counts = {0: 32, 1: 48}
    u = unit_for(64)
    a = synthetic_ms(32, u)
    b = synthetic_ms(64, u) * (synthetic_ms(48, u) / synthetic_ms(64, u)) * (synthetic_ms(32, u) / synthetic_ms(64, u))
    dw = synthetic_ms(48, u, 0.002)
    assert model.predict(counts) == pytest.approx(1.0 + 2.0 * (a + b + dw))
    assert model.predict({0: 64, 1: 64}) == pytest.approx(full)  # absent groups are whole
    assert model.by_group == {0: ["conv_a", "conv_b"], 1: ["conv_b", "dw"]}
    # JSON round trip keeps every prediction
    again = LatencyModel.from_json(model.to_json())
    assert again.predict(counts) == model.predict(counts)


def test_fastest_width_prefers_aligned_counts_and_never_exceeds_the_cap():
    model = LatencyModel(stub_table())
    assert model.fastest_width(0, at_most=63, near=63) == 56  # 63..57 slower per channel than 56 (divisible by 8)
    assert model.fastest_width(0, at_most=20, near=20) == 16
    assert lm.window_below(63) == 8 and lm.window_below(1000) == 32 and lm.window_below(6) == 3
    assert model.fastest_width(0, at_most=64, near=64) == 64
    for cap in range(2, 65):
        width = model.fastest_width(1, at_most=cap, near=cap)
        assert 1 <= width <= cap and cap - width <= lm.window_below(cap)
    assert model.fastest_width(0, at_most=40, near=40, at_least=39) in (39, 40)
    assert model.fastest_width(7, at_most=13, near=13) == 13  # a group no timed layer depends on


def test_latency_counts_meet_the_target_and_spend_low_scores_first():
    model = LatencyModel(stub_table(fixed=0.5))
    rng = np.random.default_rng(0)
    important = np.abs(rng.standard_normal(64)) + 10.0  # group 0: every channel matters a lot
    cheap = np.abs(rng.standard_normal(64)) * 0.01 + 0.01  # group 1: channels matter little
    groups = {0: GroupChoice(64, 1, mean_normalised(important) * 100.0),
              1: GroupChoice(64, 1, mean_normalised(cheap))}
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
    assert all(alignment(k, 32) >= 16 for k in auto.values())
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


def plain_cnn(widths=(64, 96, 128), residual=True, size=8):
    """Conv-BN-free chain: stem 3 -> widths[0], then 3x3 convs; with `residual`, each pair of equal widths adds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current, channels = [], [], "x", 3
    for index, width in enumerate(widths):
        w = numpy_helper.from_array(rng.standard_normal([width, channels, 3, 3]).astype(np.float32) * 0.1, f"w{index}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [current, w.name], [f"c{index}"], name=f"conv{index}", pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"], name=f"relu{index}"))
        out = f"r{index}"
        if residual and index > 0 and width == channels:
            nodes.append(helper.make_node("Add", [out, current], [f"a{index}"], name=f"add{index}"))
            out = f"a{index}"
        current, channels = out, width
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    fc = numpy_helper.from_array(rng.standard_normal([10, channels]).astype(np.float32), "fc_w")
    inits.append(fc)
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def synthetic_table_for(prepared, original_ms=10.0):
    """A table shaped like a measured one for this model, with kernel times that follow MACs and are slower at
    misaligned widths (synthetic_ms), calibrated so that the whole model takes `original_ms`."""
    from onnx_prune.runtime.cost import concrete_shapes

    prunable = {g.id for g in prepared.analysis.prunable_groups}
    dims = concrete_shapes(prepared.model, None, 1)
    nodes = {}
    for name, spec in lm._layer_specs(prepared.model, dims).items():
        out_terms = lm._width_terms(prepared.analysis, spec.node.output[0], prunable)
        in_terms = lm._width_terms(prepared.analysis, spec.node.input[0], prunable)
        if out_terms is None and in_terms is None:
            continue
        entry = {"op": spec.node.op_type, "kind": "dense"}
        cin = spec.input_dims[1]
        cout = spec.weight.shape[0]
        for axis, terms, full in (("out", out_terms, cout), ("in", in_terms, cin)):
            if terms is not None:
                widths = widths_to_measure(full)
                entry[axis] = {"full": full, "widths": widths, "terms": terms,
                               "ms": [synthetic_ms(w, unit_for(full), 0.001 * (cin if axis == "out" else cout), 0.0)
                                      for w in widths]}
        entry["full_ms"] = synthetic_ms(cout, unit_for(cout), 0.001 * cin, 0.0)
        nodes[name] = entry
    table = {"version": lm.TABLE_VERSION, "nodes": nodes,
             "calibration": {"fixed_ms": 0.0, "scale": 1.0, "points": []}}
    layers = LatencyModel(dict(table, calibration={"fixed_ms": 0.0, "scale": 1.0, "points": [{}]})).layers_ms({})
    fixed = 0.1 * original_ms
    table["calibration"] = {"fixed_ms": fixed, "scale": (original_ms - fixed) / layers,
                            "points": [{"share": 1.0, "counts": {}, "measured_ms": original_ms, "layers_ms": layers}]}
    return table


@pytest.mark.parametrize("round_to", ["auto", 1, 8])
@pytest.mark.parametrize("fraction", [0.7, 0.5])
def test_allocator_meets_a_latency_target_on_a_stub_latency_model(round_to, fraction):
    from onnx_prune.passes.allocate import Allocator
    from onnx_prune.passes.constraints import Target

    prepared = onnx_prune.prepare(plain_cnn(widths=(64, 96, 96, 128)))
    stub = LatencyModel(synthetic_table_for(prepared))
    rng = np.random.default_rng(1)
    scores = {g.id: rng.random(g.size) for g in prepared.analysis.prunable_groups}
    allocator = Allocator(prepared.analysis, scores, None, round_to, latency=stub)
    plan = allocator.allocate(Target(latency=fraction))
    counts = {gid: len(p.keep) for gid, p in plan.groups.items()}
    predicted = stub.predict(counts)
    assert predicted <= fraction * stub.original_ms
    assert predicted >= 0.8 * fraction * stub.original_ms  # no needless over-pruning
    for gid, keep in ((g, p.keep) for g, p in plan.groups.items()):
        top = np.sort(np.argsort(-scores[gid], kind="stable")[:len(keep)])
        assert keep.tolist() == top.tolist()  # the best-scoring channels stay
        if isinstance(round_to, int) and round_to > 1:
            assert len(keep) % round_to == 0
        if round_to == "auto":
            assert alignment(len(keep), unit_for(prepared.analysis.groups[gid].size)) >= 16


def test_auto_rounding_of_a_mac_target_snaps_down_to_fast_widths():
    from onnx_prune.passes.allocate import Allocator

    prepared = onnx_prune.prepare(plain_cnn(widths=(64, 96, 96, 128)))
    stub = LatencyModel(synthetic_table_for(prepared))
    scores = {g.id: np.arange(g.size, dtype=float) for g in prepared.analysis.prunable_groups}
    allocator = Allocator(prepared.analysis, scores, None, "auto", latency=stub)
    asked = {gid: prepared.analysis.groups[gid].size - 5 for gid in scores}
    settled = allocator.settle(asked)
    for gid, count in settled.items():
        assert count <= asked[gid]
        assert count % 8 == 0  # the synthetic kernels are slowest at widths 8 does not divide
        assert settled[gid] == stub.fastest_width(gid, asked[gid], asked[gid], at_least=1)


def test_prune_with_a_latency_target_uses_a_given_table(tmp_path, monkeypatch):
    """End to end through prune(): the latency model comes from --latency-table; the achieved latency is
    measured (its value is not asserted), the prediction is deterministic."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = plain_cnn(widths=(64, 96, 96, 128))
    prepared = onnx_prune.prepare(model)
    table = synthetic_table_for(prepared)
    table["key"] = cache_key(model_hash(prepared.model), "cpu", 1, 1)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(lm, "measure_table", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    outputs = []
    for _ in range(2):
        pruned, report = onnx_prune.prune(model, target_latency=0.6, threads=1, latency_table=str(path))
        outputs.append(pruned.SerializeToString())
        record = report.details["target"]
        assert record["kind"] == "latency" and record["predicted"] <= 0.6
        assert record["speed_check"]["runs"] > 0 and record["achieved"] > 0
        onnx.checker.check_model(pruned, full_check=True)
    assert outputs[0] == outputs[1]
    assert report.options["round_to"] == "size"  # the default as given; the constraint resolved it to auto
    with pytest.raises(PruneError, match="give one target"):
        onnx_prune.prune(model, target_latency=0.6, target_macs=0.5)
    with pytest.raises(PruneError, match="target_latency is the fraction to keep"):
        onnx_prune.prune(model, target_latency=1.5)


def test_measured_points_correct_a_table_that_overestimates_savings():
    """The runtime keeps a part the table misses (here 40% of the time never shrinks): target_counts measures
    its choice, adds the point, chooses again on the refined curve, and persists the grown table."""
    prepared = onnx_prune.prepare(plain_cnn(widths=(64, 96, 96, 128, 128, 160), residual=False))
    model = LatencyModel(synthetic_table_for(prepared, original_ms=10.0))
    truth = LatencyModel(json.loads(json.dumps(model.table)))

    def true_ms(counts):  # 4 ms never shrink, the rest follows the layers
        return 4.0 + 0.6 * truth.predict(counts)

    saved = []
    model.measure = true_ms
    model.persist = lambda updated: saved.append(len(updated["calibration"]["points"]))
    groups = {g.id: GroupChoice(g.size, 1, np.linspace(1, 2, g.size)) for g in prepared.analysis.prunable_groups}
    naive = latency_counts(truth, groups, 6.0, "auto")
    assert true_ms(naive) / 6.0 > 1.15  # the table alone misses the target by far
    counts = model.target_counts(groups, 0.6, "auto", rounds=4, tolerance=0.05)
    assert abs(true_ms(counts) / 6.0 - 1) <= 0.1
    assert saved and saved[-1] == len(model.table["calibration"]["points"]) >= 2
    # the grown table alone (no measuring) reproduces the choice: deterministic given the table
    again = LatencyModel(json.loads(json.dumps(model.table)))
    assert again.target_counts(groups, 0.6, "auto") == latency_counts(again, groups, 6.0, "auto")
