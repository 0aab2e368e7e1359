"""Second-order selection and reconstruction: streaming moments, group OBS, source-fold ridge choice."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.passes.obs import (ObsLayer, choose_ridge, greedy_obs, penalty, restrict, ridge_solve,
                                   squared_error)
from onnx_prune.runtime.calibration import (FoldMoments, Layer, Progress, collect_moments, feed_batches,
                                            layer_rows, source_folds, source_index)

from invariants import run


def _conv_model(w, b, x_shape, attrs):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"] + x_shape[1:])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[0], "h", "w"])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


# --- streaming moments

def test_source_folds_keep_every_source_in_one_fold_and_split_contiguously_without_sources():
    sources = np.array([7, 7, 3, 3, 3, 9, 1, 1, 7, 5])
    folds = source_folds(sources, len(sources), 3)
    for s in np.unique(sources):
        assert len(set(folds[sources == s].tolist())) == 1
    assert folds.tolist() == [0, 0, 1, 1, 1, 2, 0, 0, 0, 1]  # round-robin by first appearance
    assert source_folds(None, 8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        source_folds(sources, 4)


@pytest.mark.parametrize("positions", [1000, 7])
def test_streaming_moments_equal_the_one_shot_gram_whatever_the_batching(positions):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 1])
    model = _conv_model(w, b, [1, 3, 6, 5], attrs)
    target = _conv_model(rng.standard_normal((4, 3, 3, 3)), b, [1, 3, 6, 5], attrs)
    xs = rng.standard_normal((6, 1, 3, 6, 5)).astype(np.float32)
    feeds = [{"x": x} for x in xs]
    sources = np.array([0, 0, 1, 1, 2, 2])
    fold_of, (source_of, count) = source_folds(sources, 6, 3), source_index(sources, 6)
    layer = Layer(model.graph.node[0])
    results = []
    for batch in (1, 4, 6):
        [moments] = collect_moments(model, [layer], feed_batches(feeds, batch, True), fold_of, source_of, count,
                                    target=target, folds=3, positions=positions)
        results.append(moments)
    for other in results[1:]:
        assert np.allclose(other.gram, results[0].gram) and np.allclose(other.cross, results[0].cross)
        assert np.array_equal(other.rows, results[0].rows)
    if positions >= 1000:  # every position: the one-shot Gram of all rows at once
        x_all = np.concatenate(xs)
        y_all = run(target, [{"x": x_all}])[0]
        rows = np.arange(y_all.size // y_all.shape[1])
        features = layer_rows(layer, x_all, y_all.shape, (3, 3), rows)
        gram, cross, yy, n = results[0].total()
        assert n == len(rows) and np.allclose(gram, features.T @ features)
        y_rows = np.moveaxis(y_all, 1, -1).reshape(-1, 4).astype(np.float64)
        assert np.allclose(cross, features.T @ y_rows, rtol=1e-5) and np.allclose(yy, (y_rows ** 2).sum(0))
        per_sample = len(rows) // 6
        for f in range(3):  # fold f holds exactly the rows of source f's samples
            mine = np.concatenate([np.arange(s * per_sample, (s + 1) * per_sample) for s in np.nonzero(fold_of == f)[0]])
            assert np.allclose(results[0].gram[f], features[mine].T @ features[mine])
    else:
        assert results[0].rows.sum() == 6 * positions


def test_effective_samples_count_sources_not_rows_when_rows_of_a_source_are_alike():
    rng = np.random.default_rng(1)
    per_source, sources = 50, 20
    centres = rng.standard_normal((sources, 3))
    alike = np.repeat(centres, per_source, axis=0) + 1e-3 * rng.standard_normal((sources * per_source, 3))
    independent = rng.standard_normal((sources * per_source, 3))
    source = np.repeat(np.arange(sources), per_source)
    found = []
    for x in (alike, independent):
        moments = FoldMoments.empty(3, None, 1, sources, False)
        moments.add(x, None, np.zeros(len(x), dtype=int), source)
        found.append(moments.effective_samples())
    assert found[0] < 2 * sources < 0.5 * sources * per_source < found[1]


def test_progress_prints_one_line_per_layer_unless_quiet(capsys):
    rng = np.random.default_rng(0)
    model = _conv_model(rng.standard_normal((2, 1, 1, 1)), np.zeros(2), [1, 1, 4, 4], dict(kernel_shape=[1, 1]))
    feeds = [{"x": rng.standard_normal((1, 1, 4, 4)).astype(np.float32)} for _ in range(3)]
    for quiet in (False, True):
        progress = Progress(quiet=quiet)
        collect_moments(model, [Layer(model.graph.node[0])], feed_batches(feeds, 2, True), np.zeros(3, int),
                        np.arange(3), 3, progress=progress)
        assert len(progress.lines) == 1 and "conv" in progress.lines[0] and "48 rows" in progress.lines[0]
        assert (capsys.readouterr().err.count("\n")) == (0 if quiet else 1)


# --- group OBS

def _layer_data(rows=400, dependent=(), kernel=1, outputs=5, seed=0, bias=True):
    """Features of 6 channels (blocks of kernel columns); channel c in `dependent` = a mix of channels 0 and 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 6, kernel))
    for c in dependent:
        x[:, c] = 0.7 * x[:, 0] - 1.3 * x[:, 1] + 0.2 * c * x[:, 0]
    x = x.reshape(rows, -1)
    if bias:
        x = np.hstack([x, np.ones((rows, 1))])
    theta = rng.standard_normal((x.shape[1], outputs))
    blocks = {c: np.arange(c * kernel, (c + 1) * kernel) for c in range(6)}
    return x, theta, blocks


@pytest.mark.parametrize("kernel", [1, 9])
def test_a_channel_that_is_a_combination_of_others_is_removed_at_zero_cost_and_exactly(kernel):
    x, theta, blocks = _layer_data(dependent=(4,), kernel=kernel)
    y = x @ theta
    gram, cross = x.T @ x, x.T @ y
    layer = ObsLayer.fitted(gram, cross, np.zeros_like(theta), 1e-9 * np.trace(gram) / len(gram), True, blocks)
    costs = layer.costs(list(range(6)))
    # channels 0, 1 and 4 are each a combination of the other two; 2, 3 and 5 are not
    assert max(costs[[0, 1, 4]]) < 1e-6 * min(costs[[2, 3, 5]])
    result = greedy_obs([layer], [2, 3, 4, 5], 1)  # 0 and 1 are frozen here: 4 is the one to go
    assert result.removed == [4] and result.step_costs[0] < 1e-6 * np.sum(y ** 2)
    assert np.allclose(layer.theta[blocks[4]], 0.0)
    assert np.linalg.norm(x @ layer.theta - y) < 1e-6 * np.linalg.norm(y)


def test_reconstruction_is_exact_when_the_removed_channels_depend_on_kept_ones():
    x, theta, blocks = _layer_data(dependent=(3, 5), kernel=4, seed=2)
    y = x @ theta
    gram, cross = x.T @ x, x.T @ y
    layer = ObsLayer.fitted(gram, cross, theta, 1e-10 * np.trace(gram) / len(gram), True, blocks)
    result = greedy_obs([layer], [2, 3, 4, 5], 2)
    assert sorted(result.removed) == [3, 5]
    assert np.linalg.norm(x @ layer.theta - y) < 1e-6 * np.linalg.norm(y)
    # the OBS update equals the least-squares refit on the kept features
    kept = np.concatenate([blocks[c] for c in (0, 1, 2, 4)] + [[x.shape[1] - 1]])
    refit = np.linalg.lstsq(x[:, kept], y, rcond=None)[0]
    assert np.allclose(x[:, kept] @ layer.theta[kept], x[:, kept] @ refit, atol=1e-6)


def test_greedy_removal_matches_the_exact_constrained_minimiser_and_its_cost():
    """With noise nothing is free: each greedy step's cost is the exact rise of the ridge objective."""
    x, theta, blocks = _layer_data(kernel=2, seed=3, rows=300)
    rng = np.random.default_rng(3)
    y = x @ theta + 0.5 * rng.standard_normal((300, theta.shape[1]))
    gram, cross = x.T @ x, x.T @ y
    theta0 = theta + 0.3 * rng.standard_normal(theta.shape)
    lam = 0.05 * np.trace(gram) / len(gram)
    d = penalty(len(theta0), True)
    objective = lambda t: squared_error(gram, cross, (y ** 2).sum(0), t) + lam * np.sum((d[:, None] * (t - theta0)) ** 2)
    layer = ObsLayer.fitted(gram, cross, theta0, lam, True, blocks)
    start = objective(layer.theta)
    result = greedy_obs([layer], range(6), 3)
    kept = np.ones(len(theta0), dtype=bool)
    for c in result.removed:
        kept[blocks[c]] = False
    exact = np.zeros_like(theta0)
    exact[kept] = ridge_solve(gram[np.ix_(kept, kept)], cross[kept], theta0[kept], lam, d[kept])
    assert np.allclose(layer.theta, exact, atol=1e-7)
    assert objective(layer.theta) - start == pytest.approx(sum(result.step_costs), rel=1e-6)
    assert np.all(np.diff(result.damage) >= 0)


def test_a_channel_read_by_two_consumers_pays_both_costs():
    x, theta, blocks = _layer_data(seed=4)
    gram = x.T @ x
    first, second = theta.copy(), theta.copy()
    first[blocks[2]] *= 0.01                        # consumer one barely reads channel 2, a little of 5
    first[blocks[5]] *= 0.1
    second[blocks[5]] *= 0.1                        # consumer two reads channel 2 fully, a little of 5
    layers = [ObsLayer.fitted(gram, gram @ t, t, 1e-6, True, blocks) for t in (first, second)]
    alone = greedy_obs([ObsLayer.fitted(gram, gram @ first, first, 1e-6, True, blocks)], range(6), 1)
    assert alone.removed == [2]
    summed = layers[0].costs(list(range(6))) + layers[1].costs(list(range(6)))
    both = greedy_obs(layers, range(6), 1)
    assert both.removed == [5] and both.step_costs[0] == pytest.approx(summed[5])


# --- the ridge choice

def _fold_moments(x, y, folds):
    fold = np.arange(len(x)) * folds // len(x)
    moments = FoldMoments.empty(x.shape[1], y.shape[1], folds, len(x), True)
    moments.add(x, y, fold, np.arange(len(x)))
    return moments


def test_cross_validation_picks_little_ridge_for_clean_data_and_compensation_when_refitting_cannot_help():
    rng = np.random.default_rng(5)
    x = np.hstack([rng.standard_normal((400, 8)) + 0.5, np.ones((400, 1))])
    theta0 = rng.standard_normal((9, 3))
    truth = theta0 + rng.standard_normal((9, 3))
    clean = choose_ridge(_fold_moments(x, x @ truth, 4), theta0)
    assert clean.reconstructs and clean.relative <= 1e-3 and clean.cv_error < 1e-4 < clean.cv_compensation
    # every source (fold) has its own linear quirk, and the quirks cancel over the sources: the only thing
    # common to all of them is the kept weights' output plus a constant.  A refit learns the quirks of the
    # fitted sources and does worse on the held-out one than pinning the weights and refitting the bias
    quirks = rng.standard_normal((4, 9, 3))
    quirks -= quirks.mean(0)
    fold = np.arange(400) * 4 // 400
    target = x @ theta0 + np.array([1.0, -2.0, 0.5]) + np.einsum("rf,rfo->ro", x, quirks[fold])
    choice = choose_ridge(_fold_moments(x, target, 4), theta0)
    assert not choice.reconstructs and choice.cv_error == choice.cv_compensation
    assert all(error > choice.cv_error for key, error in choice.cv_errors.items() if key != "inf")
    assert np.allclose(choice.theta[:-1], theta0[:-1])


def test_restricted_moments_are_those_of_the_kept_columns():
    rng = np.random.default_rng(6)
    x = np.hstack([rng.standard_normal((50, 5)), np.ones((50, 1))])
    y = rng.standard_normal((50, 2))
    moments = _fold_moments(x, y, 2)
    keep = np.array([0, 3, 5])
    small = restrict(moments, keep)
    assert small.bias and np.allclose(small.total()[0], x[:, keep].T @ x[:, keep])
    assert np.allclose(small.total()[1], x[:, keep].T @ y)
    assert not restrict(moments, np.array([0, 1])).bias


# --- over a network

def _duplicated(name, pairs=2):
    """A fixture whose first prunable group with a refittable consumer has `pairs` channels duplicated."""
    from conftest import fixture_path
    from invariants import duplicate_model
    from onnx_prune.pipeline import prepare

    prepared = prepare(fixture_path(name))
    group = next(g for g in prepared.analysis.prunable_groups
                 if g.size >= 2 * pairs + 2 and g.by_role("consumer") and not g.frozen.any())
    source, copy = np.arange(pairs), np.arange(pairs) + pairs
    return prepare(duplicate_model(prepared, group, source, copy)), group.id, source, copy


@pytest.mark.parametrize("name", ["residual_add", "concat"])
def test_obs_removes_duplicated_channels_and_the_reconstruction_is_exact(name):
    from invariants import feeds_for, relative_error
    from onnx_prune.passes.obs import obs_plan
    from onnx_prune.passes.repair import repair
    from onnx_prune.passes.rewrite import ApplyPlanPass

    prepared, gid, source, copy = _duplicated(name)
    size = prepared.analysis.groups[gid].size
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=24)
    plan, details = obs_plan(prepared, {gid: size - len(source)}, calib, ridge=0.0, select_ridge=1e-7,
                             quiet=True)
    removed = set(details["groups"][0]["removed"])
    assert len(removed) == 2 and all(len(removed & {s, c}) == 1 for s, c in zip(source, copy))
    assert details["groups"][0]["damage"][-1] < 1e-4
    reduced = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    repaired, _ = repair(prepared.model, reduced, calib, prepared.analysis, plan, ridge=0.0)
    test = feeds_for(prepared.model, seed=2, batch=2, samples=2)
    assert relative_error(run(prepared.model, test), run(repaired, test)) < 1e-4
    assert relative_error(run(prepared.model, test), run(reduced, test)) > 1e-2  # the refit was needed


def test_obs_plan_is_deterministic_and_keeps_the_counts():
    from conftest import fixture_path
    from invariants import feeds_for
    from onnx_prune.passes.obs import obs_plan
    from onnx_prune.pipeline import prepare

    prepared = prepare(fixture_path("residual_add"))
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=12)
    counts = {g.id: g.size // 2 for g in prepared.analysis.prunable_groups}
    first, details = obs_plan(prepared, counts, calib, quiet=True)
    second, _ = obs_plan(prepared, counts, calib, quiet=True)
    assert first.to_json() == second.to_json()
    assert {g: len(p.keep) for g, p in first.groups.items()} == counts
    assert all(g["effective_samples"] for g in details["groups"] if g["consumers"])


# --- allocation by measured damage

def test_the_damage_allocator_takes_channels_where_they_hurt_least_and_reaches_the_target():
    """A stub damage model on residual_add's three groups: group 1 is fragile, groups 0 and 2 robust.  The
    allocation reaches the MAC target, spares the fragile group, and its summed damage is below uniform's."""
    from conftest import fixture_path
    from onnx_prune.passes.allocate import Allocator, CostModel, kept_ids
    from onnx_prune.passes.constraints import Target
    from onnx_prune.passes.obs import DamageCurve, damage_counts
    from onnx_prune.passes.plan import GroupPlan, Plan
    from onnx_prune.pipeline import prepare
    from onnx_prune.runtime.cost import count_cost

    prepared = prepare(fixture_path("residual_add"))
    analysis = prepared.analysis
    cost = count_cost(prepared.model)
    cost_model = CostModel.of(prepared.model, analysis, {n: c.macs for n, c in cost.per_node.items()})
    steepness = {0: 0.01, 1: 5.0, 2: 0.02}
    curves = {}
    for g, k in steepness.items():
        size = analysis.groups[g].size
        removed = list(range(0, size))
        curves[g] = DamageCurve(g, removed, [k * (r / size) ** 2 for r in removed])
    target = Target(macs=0.6)
    counts = damage_counts(prepared, curves, list(curves), target, cost_model)

    def fraction(counts):
        plan = Plan({g: GroupPlan(np.arange(n)) for g, n in counts.items() if n < analysis.groups[g].size})
        return cost_model.evaluate(kept_ids(analysis, plan))[0] / cost_model.macs

    def damage(counts):
        return sum(curves[g].at(analysis.groups[g].size - n) for g, n in counts.items())

    assert fraction(counts) == pytest.approx(0.6, abs=0.6 * 0.01)
    assert counts[1] == analysis.groups[1].size  # the fragile group is spared
    uniform = Allocator(analysis, {g: np.zeros(analysis.groups[g].size) for g in curves}, cost_model
                        ).counts_for(target, "uniform")
    assert damage(counts) < 0.5 * damage(uniform)


def test_damage_curves_rise_with_the_share_removed_and_start_at_zero():
    from conftest import fixture_path
    from invariants import feeds_for
    from onnx_prune.passes.obs import damage_curves
    from onnx_prune.pipeline import prepare

    prepared = prepare(fixture_path("concat"))
    feeds = feeds_for(prepared.model, seed=1, batch=1, samples=48)
    groups = [g.id for g in prepared.analysis.prunable_groups]
    curves = damage_curves(prepared, feeds, groups, ratios=(0.25, 0.5, 0.75), samples=12, quiet=True)
    assert set(curves) <= set(groups) and curves
    for curve in curves.values():
        assert curve.removed[0] == 0 and curve.damage[0] == 0.0
        assert all(d >= 0 for d in curve.damage) and curve.damage[-1] > 0
        assert curve.damage[-1] > curve.damage[1]  # measured on held-out samples: not monotone by construction


def test_obs_prune_reaches_the_target_with_a_valid_model_closer_to_the_original_than_data_free_pruning():
    from conftest import fixture_path
    from invariants import feeds_for, relative_error
    from onnx_prune.passes.constraints import Target
    from onnx_prune.passes.obs import obs_prune
    from onnx_prune.passes.rewrite import ApplyPlanPass
    from onnx_prune.pipeline import PruneOptions, build_plan, prepare
    from onnx_prune.runtime.cost import count_cost

    prepared = prepare(fixture_path("depthwise"))
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=32)
    test = feeds_for(prepared.model, seed=2, batch=4, samples=2)
    model, details, plan = obs_prune(prepared, Target(macs=0.6), calib, quiet=True)
    onnx.checker.check_model(model, full_check=True)
    macs = count_cost(prepared.model).macs
    assert count_cost(model).macs / macs == pytest.approx(0.6, abs=0.6 * 0.02)
    assert set(details) >= {"damage_curves", "allocation_per_group", "selection", "reconstruction"}
    assert sum(v["kept"] for v in details["allocation_per_group"].values()) < \
        sum(v["size"] for v in details["allocation_per_group"].values())
    base = build_plan(prepared, PruneOptions(target_macs=0.6), count_cost(prepared.model))
    data_free = ApplyPlanPass(prepared.analysis, base)(prepared.model).model
    original = run(prepared.model, test)
    assert relative_error(original, run(model, test)) < relative_error(original, run(data_free, test))


def test_a_progressive_schedule_reaches_its_last_target_in_steps():
    from conftest import fixture_path
    from invariants import feeds_for
    from onnx_prune.passes.obs import progressive_obs
    from onnx_prune.pipeline import prepare
    from onnx_prune.runtime.cost import count_cost

    prepared = prepare(fixture_path("depthwise"))
    calib = feeds_for(prepared.model, seed=1, batch=1, samples=24)
    model, steps = progressive_obs(prepared, (0.8, 0.6), calib, quiet=True, allocation="uniform")
    onnx.checker.check_model(model, full_check=True)
    assert [s["target"] for s in steps] == [0.8, 0.6]
    reached = count_cost(model).macs / count_cost(prepared.model).macs
    assert reached == pytest.approx(0.6, abs=0.03) and steps[-1]["reached"] == pytest.approx(reached)
    assert steps[0]["reached"] > steps[1]["reached"]


def test_damage_is_measured_on_sources_the_grams_never_saw():
    from onnx_prune.passes.obs import split_by_source

    feeds = [{"x": np.full((1, 2), float(i))} for i in range(20)]
    sources = np.arange(20) % 5  # five photos, their crops interleaved
    fit, held = split_by_source(feeds, sources, held=64)
    held_sources = {int(sources[int(f["x"][0, 0])]) for f in held}
    fit_sources = {int(sources[int(f["x"][0, 0])]) for f in fit}
    assert held and fit and not held_sources & fit_sources and len(fit) + len(held) == 20
    fit, held = split_by_source(feeds, None, held=3)  # no sources: a contiguous block at the end, cut to 3
    assert [int(f["x"][0, 0]) for f in held] == [15, 16, 17] and len(fit) == 17
