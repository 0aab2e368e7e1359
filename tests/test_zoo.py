"""Every zoo model from both exporters: analysis, a valid smaller model, and the zero-channel invariant."""
import sys

import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.analysis.criteria import Scoring, channel_scores
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.io import save

from conftest import ROOT, zoo_model
from invariants import feeds_for, relative_error, run, zero_channels_choice, zero_model

sys.path.insert(0, str(ROOT / "models"))
from build_zoo import EXPORTERS, MODELS  # noqa: E402 - plain lists, no torch import at module level

CASES = [(m, e) for m in MODELS for e in EXPORTERS]
COVERED = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
           "regnet_y_400mf", "shufflenet_v2_x1_0"]

pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{e}" for m, e in CASES])
def prepared(request):
    return prepare(zoo_model(*request.param))


def test_model_is_input_sensitive(prepared):
    a, b = run(prepared.model, feeds_for(prepared.model, seed=1, batch=1, samples=1)), \
        run(prepared.model, feeds_for(prepared.model, seed=2, batch=1, samples=1))
    assert relative_error(a, b) > 1e-2  # otherwise no equivalence test below could fail


def test_prune_gives_valid_smaller_model(prepared):
    report = onnx_prune.analyze(prepared.model)
    assert report.groups and any(g.size - g.frozen > 0 for g in report.groups)
    pruned, summary = onnx_prune.prune(prepared, ratio=0.3)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(prepared.model, batch=1, samples=1)
    assert [o.shape for o in run(prepared.model, feeds)] == [o.shape for o in run(pruned, feeds)]
    assert summary.macs_after < summary.macs_before


def test_zero_channels_are_removed_exactly(prepared):
    chosen = zero_channels_choice(prepared)
    zeroed = zero_model(prepared, chosen)
    pruned, _ = onnx_prune.prune(zeroed, ratio=0.3, criterion="l1")
    feeds = feeds_for(prepared.model, batch=1, samples=1)
    reference = run(zeroed, feeds)
    assert relative_error(reference, run(pruned, feeds)) < 1e-4

    # One extra live channel removed must show.  Some channels are dead (a Relu of negatives), so try the
    # strongest remaining channels of the largest groups until one changes the output.
    zeroed_prepared = prepare(zeroed)
    analysis = zeroed_prepared.analysis
    scoring = Scoring.of(zeroed_prepared.model, zeroed_prepared.weights())
    base = {g: np.setdiff1d(np.arange(analysis.groups[g].size), r) for g, r in chosen.items()}
    candidates = []
    for group in sorted((analysis.groups[g] for g in chosen), key=lambda g: -g.size)[:4]:
        score = channel_scores(group, scoring, "l1")
        score[chosen[group.id]] = -1
        score[group.frozen] = -1
        candidates += [(group, int(c)) for c in np.argsort(-score, kind="stable")[:3]]
    errors = []
    for group, extra in candidates:
        plan = Plan({g: GroupPlan(keep) for g, keep in base.items()})
        plan.groups[group.id] = GroupPlan(np.setdiff1d(base[group.id], [extra]))
        errors.append(relative_error(reference, run(ApplyPlanPass(analysis, plan)(zeroed).model, feeds)))
        if errors[-1] > 1e-4:
            break
    assert max(errors) > 1e-4, errors


@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_prunable_share_of_conv_macs(name, exporter):
    report = onnx_prune.analyze(zoo_model(name, exporter))
    assert report.prunable_mac_share > 0.9, report.frozen_reasons


def test_prune_is_deterministic_to_the_byte(tmp_path):
    path = zoo_model("resnet50", "torchscript")
    first, _ = onnx_prune.prune(path, ratio=0.5)
    second, _ = onnx_prune.prune(path, ratio=0.5)
    save(first, tmp_path / "a.onnx", input_path=path)
    save(second, tmp_path / "b.onnx", input_path=path)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_external_data_in_external_data_out(tmp_path):
    path = zoo_model("resnet18", "dynamo")
    prepared_model = prepare(path)
    assert prepared_model.external_data
    pruned, _ = onnx_prune.prune(prepared_model, ratio=0.3)
    out = save(pruned, tmp_path / "small.onnx", input_path=path, external_data=True)
    assert (tmp_path / "small.onnx.data").exists()
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    feeds = feeds_for(prepared_model.model, batch=1, samples=1)
    assert relative_error(run(pruned, feeds), run(reloaded, feeds)) == 0.0


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_mac_target_is_met_within_one_percent(name, allocation):
    from onnx_prune.runtime.cost import count_cost

    path = zoo_model(name, "torchscript")
    pruned, report = onnx_prune.prune(path, target_macs=0.5, allocation=allocation)
    achieved = count_cost(pruned).macs / report.macs_before
    assert abs(achieved - 0.5) <= 0.005, achieved  # within 1% of the target
    onnx.checker.check_model(pruned, full_check=True)


def test_param_target_with_rounding(tmp_path):
    from onnx_prune.runtime.cost import count_cost

    pruned, report = onnx_prune.prune(zoo_model("resnet18", "torchscript"), target_params=0.6, round_to=8)
    assert abs(count_cost(pruned).params / report.params_before - 0.6) <= 0.006
