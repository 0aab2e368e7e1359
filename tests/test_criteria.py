"""Criteria on hand-made weights with known rankings, Domino against the coupling-blind baseline, BatchNorm in
the scores (folded once, never twice), honest Nystrom, and prune() choosing by the criterion it was given.

Each test that guards against a specific wrong behaviour says which deliberately broken variant it was run
against (and failed on)."""
import fnmatch

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_prune
from onnx_prune.analysis.criteria import (CRITERIA, FilterSet, Scoring, channel_scores, fpgm, l1, l2, nearest_exact,
                                          nearest_nystrom, nystrom, nystrom_neighbours, prototypes, random_scores,
                                          removed_weights, similarity)
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.passes.similarity import SimilaritySelect
from onnx_prune.pipeline import prepare

from conftest import fixture_path
from invariants import feeds_for, relative_error, run


def _filters(rows, kernel=1):
    rows = np.asarray(rows, dtype=np.float64)
    n = len(rows)
    return FilterSet("conv", "producer", np.column_stack([rows, np.zeros(n)]), np.arange(n), np.arange(n), kernel)


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _set_weight(model, name, value):
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _folded_rows(w, conv, bn, eps=1e-5):
    """By hand: conv rows (output channel first) with the BN after it folded in, bias column last."""
    scale = w[f"{bn}.scale"] / np.sqrt(w[f"{bn}.var"] + eps)
    rows = w[f"{conv}.weight"].reshape(len(scale), -1) * scale[:, None]
    return np.column_stack([rows, w[f"{bn}.bias"] - w[f"{bn}.mean"] * scale])


# --- single-layer criteria

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


# --- Nystrom: exact at the default, measured when asked to approximate

@pytest.mark.parametrize("n_filters", [1024, 2048])
def test_nystrom_equals_exact_when_landmarks_reach_the_rank(n_filters):
    rng = np.random.default_rng(n_filters)
    weights = rng.standard_normal((n_filters, 16, 3, 3))  # 3x3 kernels: prototypes of rank <= 9
    filters = _filters(weights.reshape(n_filters, -1), kernel=9)
    proto = prototypes(filters)
    exact_neighbour, exact_distance = nearest_exact(proto)
    for landmarks in (9, None):  # None: the prototypes' rank, found by the pivoted QR (9 here)
        approx_neighbour, approx_distance = nearest_nystrom(proto, landmarks=landmarks)
        assert np.array_equal(exact_neighbour, approx_neighbour)
        assert np.allclose(exact_distance, approx_distance, atol=1e-8)
    assert nystrom_neighbours(proto).rank == 9
    assert np.allclose(similarity(filters), nystrom(filters), atol=1e-8)
    # fewer landmarks than the rank is an approximation, and it shows
    assert not np.allclose(exact_distance, nearest_nystrom(proto, landmarks=3)[1], atol=1e-6)


@pytest.mark.parametrize("n_out, n_in", [(256, 128), (512, 256)])
def test_nystrom_default_agrees_with_exact_on_1x1_layers(n_out, n_in):
    """1x1 prototypes are whole rows (rank n_in).  Broken variant checked: the former default of 9 landmarks
    (`landmarks=9` here) agrees on 4.7% / 1.0% of the neighbours and fails the 0.9 floor."""
    rng = np.random.default_rng(n_out)
    proto = prototypes(_filters(rng.standard_normal((n_out, n_in))))
    exact_neighbour, _ = nearest_exact(proto)
    fit = nystrom_neighbours(proto)
    assert fit.rank == n_in and fit.landmarks == n_in
    agreement = float(np.mean(fit.neighbour == exact_neighbour))
    assert agreement >= 0.9
    assert fit.agreement >= 0.9 and fit.summary()["exact"]


def test_nystrom_with_few_landmarks_reports_its_measured_error():
    """Asked for fewer landmarks than the rank, the fit says how far it is: its sampled agreement is close to
    the agreement over all filters, and its similarity error is large.  Broken variant checked: reporting
    agreement 1.0 unconditionally (as the old help text's "exact" implied) fails the closeness assertion."""
    rng = np.random.default_rng(1)
    proto = prototypes(_filters(rng.standard_normal((256, 128))))
    exact_neighbour, _ = nearest_exact(proto)
    fit = nystrom_neighbours(proto, landmarks=9)
    actual = float(np.mean(fit.neighbour == exact_neighbour))
    assert actual < 0.2 and not fit.summary()["exact"]
    assert abs(fit.agreement - actual) < 0.15
    assert fit.similarity_error > 0.1


def test_nystrom_criterion_notes_its_fit_per_layer():
    prepared = prepare(fixture_path("residual_add"))
    scoring = Scoring.of(prepared.model, prepared.weights())
    group = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    channel_scores(group, scoring, "nystrom", "first")
    note = scoring.notes["nystrom"]["conv0"]
    assert note["landmarks"] == note["rank"] <= 9 and note["exact"] and note["sampled_agreement"] == 1.0


# --- aggregation over coupled layers, and BatchNorm counted once

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


def _params(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_normalize_divides_by_the_weights_a_removal_really_deletes():
    """The "-avg" variant divides by the weights removing a channel deletes.  Oracle: remove one channel with
    the rewrite and count the parameters that went.  (Replaces a tautology that multiplied the normalised
    score back by domino/normalised.)  Broken variants checked: dividing by the producers' weights only, and
    by count + 1, both fail."""
    prepared = prepare(fixture_path("residual_add"))
    scoring = Scoring.of(prepared.model, prepared.weights())
    before = _params(prepared.model)
    for group in prepared.analysis.prunable_groups:
        domino = channel_scores(group, scoring, "l1", "domino-o")
        normalized = channel_scores(group, scoring, "l1", "domino-o", normalize=True)
        for c in (0, group.size - 1):
            keep = np.setdiff1d(np.arange(group.size), [c])
            pruned = ApplyPlanPass(prepared.analysis, Plan({group.id: GroupPlan(keep)}))(prepared.model).model
            deleted = before - _params(pruned)
            assert deleted == removed_weights(group, prepared.weights())[c]
            assert normalized[c] == pytest.approx(domino[c] / deleted, rel=1e-12)


def test_domino_o_counts_a_folded_batchnorm_once():
    """depthwise fixture, group conv1 -> bn1 -> clip -> conv2 (depthwise) -> bn2 -> clip -> conv3.  Domino-o is
    the l2 of conv1's rows with bn1 folded plus conv2's rows with bn2 folded, and nothing else.  Broken
    variant checked: the former scores, which added bn1 and bn2 again as [gamma, beta] 'layers' (mixed units),
    differ from this by more than 1e-3 relative."""
    prepared = prepare(fixture_path("depthwise"))
    w = _weights(prepared.model)
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    expected = np.linalg.norm(_folded_rows(w, "conv1", "bn1"), axis=1)
    depthwise = np.linalg.norm(_folded_rows(w, "conv2", "bn2"), axis=1)
    per_channel = len(depthwise) // group.size  # depthwise positions of each channel (multiplier)
    expected = expected + depthwise.reshape(group.size, per_channel).sum(axis=1)
    scores = channel_scores(group, Scoring.of(prepared.model, prepared.weights(), bn_mode="folded"), "l2",
                            "domino-o")
    np.testing.assert_allclose(scores, expected, rtol=1e-9)


def test_gamma_mode_scores_raw_filters_times_gamma():
    """bn_mode="gamma": raw conv rows (no 1/sigma, no BN shift) times |gamma| per channel."""
    prepared = prepare(fixture_path("depthwise"))
    w = _weights(prepared.model)
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    scoring = Scoring.of(prepared.model, prepared.weights(), bn_mode="gamma")
    raw = np.linalg.norm(w["conv1.weight"].reshape(group.size, -1), axis=1)  # conv1 has no bias: column 0
    np.testing.assert_allclose(channel_scores(group, scoring, "l2", "first"), raw * np.abs(w["bn1.scale"]),
                               rtol=1e-9)


def test_bn_criterion_reads_gamma():
    prepared = prepare(fixture_path("se"))
    group = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    scoring = Scoring.of(prepared.model, prepared.weights())
    gamma = prepared.weights()("bn0.scale")
    assert np.array_equal(np.argsort(channel_scores(group, scoring, "bn")), np.argsort(np.abs(gamma)))


# --- prune() keeps what the requested criterion ranks highest

# per group (by producer): a tensor and axis whose slices are distinct per channel and that pruning only slices
# (compensation edits consumer biases, so no bias serves)
MARKERS = {"conv0": ("bn0.scale", 0), "conv1": ("bn1.scale", 0), "conv5": ("fc.weight", 1)}


def _kept_channels(original: dict, pruned: onnx.ModelProto, marker: tuple[str, int]) -> np.ndarray:
    """Which channels of the original survive, read off slices of a tensor that are distinct per channel."""
    name, axis = marker
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}[name].astype(np.float64)
    before = np.moveaxis(original[name], axis, 0).reshape(original[name].shape[axis], -1)
    after = np.moveaxis(after, axis, 0).reshape(after.shape[axis], -1)
    return np.sort([c for c in range(len(before)) if any(np.array_equal(before[c], row) for row in after)])


def _top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    return np.sort(np.lexsort((np.arange(len(scores)), -scores))[:n_keep])


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn", "random", "similarity", "nystrom"])
@pytest.mark.parametrize("aggregate", ["first", "domino-o", "domino-io", "mean", "max"])
def test_every_criterion_and_aggregation_keeps_its_own_top_channels(criterion, aggregate):
    """The pruned model is valid, cheaper, and keeps in every group exactly the channels the requested
    criterion ranks highest; for random, also not what l2 keeps (the plans really differ).  Broken variants
    checked: `random` returning l2's scores, and prune() ignoring --criterion (always l2): both fail."""
    source = fixture_path("depthwise")
    model, report = onnx_prune.prune(source, ratio=0.5, criterion=criterion, aggregate=aggregate)
    onnx.checker.check_model(model, full_check=True)
    assert report.macs_after < report.macs_before
    prepared = prepare(source)
    original = _weights(prepared.model)
    scoring = Scoring.of(prepared.model, prepared.weights())
    differs_from_l2 = False
    for producer, marker in MARKERS.items():
        group = next(g for g in prepared.analysis.groups if producer in g.nodes("producer"))
        kept = _kept_channels(original, model, marker)
        assert len(kept) == group.size // 2
        if criterion in ("similarity", "nystrom"):
            continue  # a select, not a top-k: below
        assert np.array_equal(kept, _top(channel_scores(group, scoring, criterion, aggregate), len(kept)))
        differs_from_l2 |= not np.array_equal(kept, _top(channel_scores(group, scoring, "l2", aggregate), len(kept)))
    if criterion == "random":
        assert differs_from_l2


def test_random_depends_on_the_seed_and_the_others_do_not():
    """Broken variant checked: CRITERIA['random'] = l2 keeps the same channels for every seed: fails."""
    source = fixture_path("depthwise")
    original = _weights(prepare(source).model)
    kept = {}
    for criterion in ("random", "l2"):
        for seed in (0, 1, 2):
            model, _ = onnx_prune.prune(source, ratio=0.5, criterion=criterion, seed=seed)
            kept[criterion, seed] = tuple(tuple(_kept_channels(original, model, m)) for m in MARKERS.values())
    assert len({kept["random", s] for s in (0, 1, 2)}) > 1
    assert len({kept["l2", s] for s in (0, 1, 2)}) == 1


def test_similarity_method_keeps_one_of_a_duplicate_pair():
    """--method similarity: of two identical filters one goes first; with the neighbour merge its consumer
    columns fold into the kept twin, so outputs do not change."""
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
    plan = SimilaritySelect(scoring, True)(group, group.size - 1)
    assert 3 not in plan.keep or 1 not in plan.keep
    pruned, _ = onnx_prune.prune(duplicated, ratio=0.25, method="similarity", merge_neighbours=True)
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
    original = _weights(model)
    for criterion in ("apoz", "activation"):
        # the same share of every group (with --calib the default allocation measures sensitivity), weights
        # as the plan leaves them (no recalibration)
        pruned, report = onnx_prune.prune(model, ratio=0.25, criterion=criterion, calib=str(data), compensate=False,
                                          allocation="uniform", recalibrate=False)
        conv1 = next(g for g in report.groups if g.name == "conv1")
        assert conv1.kept == 3
        kept = _kept_channels(original, pruned, ("conv1.bias", 0))  # no compensation: biases only sliced
        assert len(kept) == 3 and 2 not in kept



def test_calibration_criteria_are_listed_and_scored_by_the_criteria_registry():
    """analysis.criteria lists every criterion (data-free and calibration ones) and dispatches the calibration
    ones to their measurement: per channel, the mean |x| (activation) and 1 - share of zeros (apoz) of what the
    group's consumer reads, here computed directly from onnxruntime on the Relu output."""
    import onnxruntime as ort

    from onnx_prune.analysis.criteria import CALIBRATION_CRITERIA, CRITERION_NAMES, calibration_scores

    assert set(CALIBRATION_CRITERIA) == {"activation", "apoz"}
    assert not set(CALIBRATION_CRITERIA) & set(CRITERION_NAMES)
    prepared = prepare(dead_channel_model())
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    feeds = feeds_for(prepared.model, seed=0, batch=1, samples=5)
    probe = onnx.ModelProto()
    probe.CopyFrom(prepared.model)
    probe.graph.output.append(onnx.ValueInfoProto(name="r1"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    read = np.concatenate([session.run(["r1"], feed)[0] for feed in feeds])  # (samples, 8, 8, 8)
    per_channel = np.moveaxis(read, 1, 0).reshape(8, -1)
    expected = {"activation": np.abs(per_channel).mean(axis=1), "apoz": 1 - (per_channel == 0).mean(axis=1)}
    for criterion in CALIBRATION_CRITERIA:
        scores = calibration_scores(prepared.model, prepared.analysis, [group.id], feeds, criterion)
        assert np.allclose(scores[group.id], expected[criterion], rtol=1e-6), criterion


# --- bnvar: the variance of what consumers read, times their squared weights

def dead_channel_model(dead=3, channels=8, seed=0):
    """x -> 1x1 conv -> BN -> Relu -> 1x1 conv -> y.  Channel `dead` has beta << 0, small gamma and a tiny
    running variance: after the Relu it is almost always 0, yet BN folding multiplies its filter by
    gamma / sigma ~ 5."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.normal(0.0, 0.5, channels)
    mean, var = rng.normal(0.0, 0.2, channels), rng.uniform(0.5, 2.0, channels)
    gamma[dead], beta[dead], var[dead] = 0.05, -3.0, 1e-4
    tensors = {"w1": rng.standard_normal((channels, 4, 1, 1)) * 0.5, "bn.scale": gamma, "bn.bias": beta,
               "bn.mean": mean, "bn.var": var, "w2": rng.standard_normal((6, channels, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"],
                              name="bn"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "dead_channel", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bnvar_removes_a_nearly_dead_channel_first_where_folded_l2_keeps_it():
    """Issue 15: BN-folded magnitudes inflate channels with a tiny running variance.  Broken variants checked:
    bnvar taken before the activation (E[z^2] = beta^2 + gamma^2 of the BN output ranks the dead channel
    first to KEEP) and bnvar replaced by the folded l2 both fail."""
    prepared = prepare(dead_channel_model())
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    scoring = Scoring.for_prepared(prepared)
    folded_l2 = channel_scores(group, Scoring.for_prepared(prepared, bn_mode="folded"), "l2", "domino-o")
    bnvar = channel_scores(group, scoring, "bnvar")
    assert int(np.argmax(folded_l2)) == 3  # today's default keeps it above every other channel
    assert int(np.argmin(bnvar)) == 3 and bnvar[3] < 1e-6 * np.sort(bnvar)[1]
    assert scoring.notes["bnvar"][group.id] == "bn"  # data-free, from the BatchNorm


def test_bnvar_is_the_output_error_of_a_compensated_removal():
    """With measured statistics and a 1x1 consumer, bnvar(c) is exactly the mean squared change of the
    consumer's output when channel c is replaced by its mean: ||W2[:, c]||^2 Var[relu_c]."""
    model = dead_channel_model()
    prepared = prepare(model)
    feeds = [{"x": np.random.default_rng(s).standard_normal((1, 4, 8, 8)).astype(np.float32)} for s in range(12)]
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    bnvar = channel_scores(group, Scoring.for_prepared(prepared, calib=feeds), "bnvar")
    w = _weights(prepared.model)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    conv = np.einsum("oi,nihw->nohw", w["w1"][:, :, 0, 0], x)
    scale = w["bn.scale"] / np.sqrt(w["bn.var"] + 1e-5)
    relu = np.maximum((conv - w["bn.mean"][:, None, None]) * scale[:, None, None] + w["bn.bias"][:, None, None], 0)
    centred = relu - relu.mean(axis=(0, 2, 3), keepdims=True)
    change = np.einsum("oc,nchw->cnohw", w["w2"][:, :, 0, 0], centred)  # output change removing c alone
    damage = (change ** 2).sum(axis=2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(bnvar, damage, rtol=1e-4)


def test_bnvar_reads_the_batchnorm_through_clip_data_free():
    """depthwise fixture, group conv1: its consumer conv3 reads clip(bn2(.), 0, 6).  bnvar = Var[clip(z)]
    with z ~ N(beta2, gamma2^2) times ||W3[:, c]||^2, the variance checked by Monte Carlo (1%)."""
    prepared = prepare(fixture_path("depthwise"))
    w = _weights(prepared.model)
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    bnvar = channel_scores(group, Scoring.for_prepared(prepared), "bnvar")
    z = np.random.default_rng(0).standard_normal((400_000, 1)) * w["bn2.scale"] + w["bn2.bias"]
    var = np.clip(z, 0.0, 6.0).var(axis=0)
    energy = (w["conv3.weight"][:, :, 0, 0] ** 2).sum(axis=0)
    np.testing.assert_allclose(bnvar, var * energy, rtol=0.01)


def test_only_bnvar_is_comparable_across_groups():
    from onnx_prune.analysis.criteria import CRITERION_NAMES, comparable_across_groups

    assert [c for c in CRITERION_NAMES if comparable_across_groups(c)] == ["bnvar"]


def test_bnvar_needs_statistics():
    prepared = prepare(fixture_path("depthwise"))
    group = prepared.analysis.prunable_groups[0]
    with pytest.raises(ValueError, match="statistics"):
        channel_scores(group, Scoring.of(prepared.model, prepared.weights()), "bnvar")
