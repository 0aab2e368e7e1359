"""Blended criteria: clustering on known correlation structures, a search that beats its pool, determinism,
re-applying saved weights."""
import numpy as np
import pytest

from onnx_prune.analysis.blend import (cluster_criteria, format_cluster_summary, rank_correlation, representative,
                                       summarize_clusters)
from onnx_prune.blend_search import (blend_plan, criteria_clusters, generated_inputs, load_blend_weights,
                                     save_blend_weights)
from onnx_prune.errors import PruneError
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import PruneOptions, build_plan, prepare
from onnx_prune.runtime.cost import count_cost
from onnx_prune.runtime.fidelity import compare

from conftest import fixture_path

SEARCH = dict(generations=4, population=8, progress=False)


def _synthetic(n=40, seed=0):
    """Criteria rows: a, a near-twin, its opposite, an independent one."""
    rng = np.random.default_rng(seed)
    a = rng.random(n)
    return np.vstack([a, a + 1e-3 * rng.standard_normal(n), -a, rng.random(n)])


def test_clusters_follow_the_correlation_structure():
    rho = rank_correlation(_synthetic())
    assert rho[0, 1] > 0.99 and rho[0, 2] == pytest.approx(-1.0) and abs(rho[0, 3]) < 0.4
    assert cluster_criteria(rho, threshold=0.2) == [[0, 1], [2], [3]]
    assert cluster_criteria(rho, threshold=2.0) == [[0, 1, 2, 3]]  # a cut above every distance: one cluster
    assert representative(rho, [0, 1]) in (0, 1) and representative(rho, [3]) == 3


def test_representative_is_the_member_closest_to_the_others():
    rho = np.array([[1.0, 0.9, 0.7], [0.9, 1.0, 0.9], [0.7, 0.9, 1.0]])
    assert cluster_criteria(rho, threshold=0.25) == [[0, 1, 2]]
    assert representative(rho, [0, 1, 2]) == 1


def test_a_constant_criterion_ranks_nothing_and_stands_alone():
    rows = np.vstack([_synthetic()[:2], np.ones(40)])
    rho = rank_correlation(rows)
    assert rho[2, 0] == 0.0 and rho[2, 2] == 1.0
    assert cluster_criteria(rho) == [[0, 1], [2]]


def test_summary_counts_structures_and_formats():
    prepared = prepare(fixture_path("residual_add"))
    gids = [g.id for g in prepared.analysis.prunable_groups]
    scores = {name: {} for name in ("a", "twin", "anti", "other")}
    for gid in gids:  # the same structure in every group
        rows = _synthetic(prepared.analysis.groups[gid].size, seed=gid)
        for name, row in zip(scores, rows):
            scores[name][gid] = row
    summary = summarize_clusters(scores, prepared.analysis)
    assert summary["structures"] == [{"clusters": [["a", "twin"], ["anti"], ["other"]], "groups": len(gids),
                                      "share": 1.0}]
    assert summary["model"]["clusters"] == [["a", "twin"], ["anti"], ["other"]]
    text = format_cluster_summary(summary, per_group=True)
    assert "{a twin} {anti} {other}" in text and f"{len(gids)}/{len(gids)} groups" in text


def test_calibration_data_adds_activation_criteria_to_the_pool():
    prepared = prepare(fixture_path("se"))
    summary = criteria_clusters(prepared, calib_inputs=generated_inputs(prepared.model, seed=1, count=8))
    assert summary["pool"] == ["l1", "l2", "fpgm", "bn", "similarity", "bnvar", "activation", "apoz"]
    assert sorted(sum(summary["model"]["clusters"], [])) == sorted(summary["pool"])


def _lexicographic(report) -> tuple[float, float]:
    """(1 - top-1 agreement, relative error) of the single output, measured by `fidelity.compare`."""
    out = report.outputs[0]
    return round(1.0 - out.top1_agreement, 9), out.relative_error


def test_search_is_at_least_as_good_as_every_single_criterion():
    prepared = prepare(fixture_path("depthwise"))
    opts = PruneOptions(target_macs=0.5)
    plan, report = blend_plan(prepared, opts, **SEARCH)
    singles = report["singles"]
    assert set(singles) == {"l1", "l2", "fpgm", "bn", "similarity", "bnvar"}
    assert report["fitness"]["loss"] <= min(s["loss"] for s in singles.values())
    assert report["fitness_data"].startswith("generated inputs") and "top-1 agreement" in report["metric"]
    # measured again, independently: the pipeline's single-criterion plans against the blend's, by compare()
    feeds = generated_inputs(prepared.model, opts.seed)
    blended = _lexicographic(compare(prepared.model, ApplyPlanPass(prepared.analysis, plan)(prepared.model).model,
                                     feeds))
    cost = count_cost(prepared.model)
    for criterion in singles:
        # at the search's own allocation (uniform: see blend_search.blend_allocation)
        single_plan = build_plan(prepared, PruneOptions(target_macs=0.5, criterion=criterion,
                                                        allocation="uniform"), cost)
        single = _lexicographic(compare(prepared.model,
                                        ApplyPlanPass(prepared.analysis, single_plan)(prepared.model).model, feeds))
        assert blended[0] < single[0] or (blended[0] == single[0] and blended[1] <= single[1] * (1 + 1e-5)), criterion
    assert report["fitness"]["macs_kept"] == pytest.approx(0.5, abs=0.1)


def test_same_seed_same_alpha_whatever_the_worker_count():
    prepared = prepare(fixture_path("depthwise"))
    _, one = blend_plan(prepared, PruneOptions(target_macs=0.5), workers=1, **SEARCH)
    _, two = blend_plan(prepared, PruneOptions(target_macs=0.5), workers=2, **SEARCH)
    assert one["weights"] == two["weights"] and one["search"]["evaluations"] == two["search"]["evaluations"]
    # (another seed may well find the same optimum: with bnvar in the pool it dominates this fixture)
    _, other = blend_plan(prepared, PruneOptions(target_macs=0.5, seed=1), workers=2, **SEARCH)
    _, again = blend_plan(prepared, PruneOptions(target_macs=0.5, seed=1), workers=1, **SEARCH)
    assert other["weights"] == again["weights"] and other["search"] == {**again["search"], "workers": 2,
                                                                          "seconds": other["search"]["seconds"]}


def test_saved_weights_reproduce_the_plan(tmp_path):
    prepared = prepare(fixture_path("se"))
    opts = PruneOptions(target_macs=0.6)
    plan, report = blend_plan(prepared, opts, **SEARCH)
    path = tmp_path / "blend.json"
    save_blend_weights(report, path)
    assert load_blend_weights(path) == report["weights"]
    again, replay = blend_plan(prepared, opts, blend_weights=path)
    assert replay["mode"] == "re-applied"
    assert sorted(again.groups) == sorted(plan.groups)
    for gid, group_plan in plan.groups.items():
        assert np.array_equal(again.groups[gid].keep, group_plan.keep)


def test_time_budget_stops_after_a_generation():
    prepared = prepare(fixture_path("se"))
    _, report = blend_plan(prepared, PruneOptions(target_macs=0.5), time_budget=0.0, **SEARCH)
    assert report["search"]["stopped"] == "time budget" and report["search"]["generations_run"] == 1


def test_bad_weights_file_is_a_prune_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"weights": {"l7": 1.0}}')
    with pytest.raises(PruneError, match="criteria must be among"):
        load_blend_weights(path)
