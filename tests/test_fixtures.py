"""Analysis and rewrite on the hand-built fixtures: expected groups, frozen reasons, and the invariants."""
import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.cost import count_cost

from conftest import FIXTURES, fixture_path
from invariants import (duplicate_model, feeds_for, relative_error, run, zero_channels_choice, zero_model)

ALL = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
PRUNABLE = [name for name in ALL if name not in ("loop_subgraph",)]
DYNAMIC_SPATIAL = {"paddle_se"}


def _group_of(prepared, producer_node):
    return next(g for g in prepared.analysis.groups if producer_node in g.nodes("producer"))


@pytest.mark.parametrize("name", PRUNABLE)
def test_prune_gives_valid_smaller_model(name):
    prepared = prepare(fixture_path(name))
    model, report = onnx_prune.prune(fixture_path(name), ratio=0.3)
    onnx.checker.check_model(model, full_check=True)
    feeds = feeds_for(prepared.model)
    before, after = run(prepared.model, feeds), run(model, feeds)
    assert [o.shape for o in before] == [o.shape for o in after]
    if name in DYNAMIC_SPATIAL:  # MACs need a concrete input size (the CLI's --shape)
        shape = {"x": [1, 3, 8, 8]}
        assert count_cost(model, shape).macs < count_cost(prepared.model, shape).macs
    else:
        assert report.macs_after < report.macs_before
    assert report.channels_after < report.channels_before


@pytest.mark.parametrize("name", PRUNABLE)
def test_zero_channels_are_removed_exactly(name):
    prepared = prepare(fixture_path(name))
    chosen = zero_channels_choice(prepared)
    assert chosen, "every prunable fixture has a group large enough to lose a channel"
    zeroed = zero_model(prepared, chosen)
    pruned, _ = onnx_prune.prune(zeroed, ratio=0.3, criterion="l1")
    feeds = feeds_for(prepared.model)
    assert relative_error(run(zeroed, feeds), run(pruned, feeds)) < 1e-4

    # The same check must fail when one more, non-zero channel goes.
    analysis = prepare(zeroed).analysis
    gid, removed = next((g, r) for g, r in chosen.items() if analysis.groups[g].prunable > len(r))
    group = analysis.groups[gid]
    extra = next(c for c in range(group.size) if c not in removed and not group.frozen[c])
    plan = Plan({g: GroupPlan(np.setdiff1d(np.arange(analysis.groups[g].size), r)) for g, r in chosen.items()})
    plan.groups[gid] = GroupPlan(np.setdiff1d(np.arange(group.size), np.append(removed, extra)))
    broken = ApplyPlanPass(analysis, plan)(prepare(zeroed).model).model
    assert relative_error(run(zeroed, feeds), run(broken, feeds)) > 1e-3


@pytest.mark.parametrize("name", ["residual_add", "concat", "se", "depthwise", "flatten_gemm", "channel_shuffle",
                                  "grouped_conv", "nhwc_transpose", "shared_weight"])
def test_duplicate_channels_merge_exactly(name):
    prepared = prepare(fixture_path(name))
    group = max(prepared.analysis.prunable_groups, key=lambda g: g.size)
    free = np.nonzero(~group.frozen)[0]
    feeds = feeds_for(prepared.model)
    fold_mattered = False
    pairs = [(int(a), int(b)) for a in free[:6] for b in free if b != a and all(
        (m.channels == a).sum() == (m.channels == b).sum() for m in group.members)]
    for source, copy in pairs[:40]:  # a pair a Relu kills would merge exactly even without the fold
        duplicated = duplicate_model(prepared, group, source, copy)
        keep = np.setdiff1d(np.arange(group.size), [copy])
        fold = np.eye(group.size)[:, keep]
        fold[copy, np.searchsorted(keep, source)] = 1.0  # the copy's consumers now read the source
        merged = ApplyPlanPass(prepared.analysis, Plan({group.id: GroupPlan(keep, fold)}))(duplicated).model
        onnx.checker.check_model(merged, full_check=True)
        reference = run(duplicated, feeds)
        assert relative_error(reference, run(merged, feeds)) < 1e-4
        pruned = ApplyPlanPass(prepared.analysis, Plan({group.id: GroupPlan(keep)}))(duplicated).model
        fold_mattered |= relative_error(reference, run(pruned, feeds)) > 1e-3
        if fold_mattered:
            break
    assert fold_mattered, "dropping a live duplicate without folding it must change the output"


@pytest.mark.parametrize("name", ["residual_add", "channel_shuffle", "depthwise"])
def test_plan_that_removes_nothing_is_identity(name):
    prepared = prepare(fixture_path(name))
    plan = Plan({g.id: GroupPlan(np.arange(g.size)) for g in prepared.analysis.groups})
    result = ApplyPlanPass(prepared.analysis, plan)(prepared.model)
    assert not result.modified
    feeds = feeds_for(prepared.model)
    assert relative_error(run(prepared.model, feeds), run(result.model, feeds)) == 0.0
    model, _ = onnx_prune.prune(fixture_path(name), ratio=0.0)
    assert relative_error(run(prepared.model, feeds), run(model, feeds)) == 0.0


def test_rewrite_does_not_mutate_its_input():
    prepared = prepare(fixture_path("residual_add"))
    before = prepared.model.SerializeToString()
    onnx_prune.prune(prepared.model, ratio=0.5)
    plan = Plan({g.id: GroupPlan(np.arange(g.size // 2)) for g in prepared.analysis.prunable_groups})
    ApplyPlanPass(prepared.analysis, plan)(prepared.model)
    assert prepared.model.SerializeToString() == before


@pytest.mark.parametrize("options", [dict(target_macs=0.7), dict(method="centripetal", ratio=0.4),
                                     dict(method="red", ratio=0.4), dict(method="similarity", ratio=0.4),
                                     dict(criterion="fpgm", ratio=0.4, allocation="global")])
def test_no_method_changes_the_callers_model(options):
    """The Python API is handed a ModelProto that the caller still owns: whatever the method (sensitivity
    trials, BatchNorm folding, hashing, merging), that object is byte-identical afterwards."""
    model = onnx.load(fixture_path("residual_add"))
    before = model.SerializeToString()
    pruned, _ = onnx_prune.prune(model, progress=False, **options)
    assert model.SerializeToString() == before
    assert pruned.SerializeToString() != before


def test_residual_add_couples_the_block_and_freezes_the_classifier():
    prepared = prepare(fixture_path("residual_add"))
    stem = _group_of(prepared, "conv0")
    assert {"conv0", "conv2"} <= set(stem.nodes("producer"))  # the identity shortcut ties them
    fc = _group_of(prepared, "fc")
    assert fc.frozen.all() and "graph output" in fc.reasons[0]


def test_concat_consumer_sees_both_branches_at_their_offsets():
    prepared = prepare(fixture_path("concat"))
    a, b = _group_of(prepared, "conv1"), _group_of(prepared, "conv2")
    assert a.id != b.id and a.size == 4 and b.size == 6
    consumer_a = next(m for m in a.by_role("consumer") if m.node == "conv3")
    consumer_b = next(m for m in b.by_role("consumer") if m.node == "conv3")
    assert list(consumer_a.positions) == [0, 1, 2, 3]
    assert list(consumer_b.positions) == [4, 5, 6, 7, 8, 9]


def test_se_gate_is_tied_to_the_features_it_scales():
    prepared = prepare(fixture_path("se"))
    features = _group_of(prepared, "conv0")
    assert "conv2" in features.nodes("producer")  # the excitation conv's output multiplies the features


def test_depthwise_shrinks_with_its_group_attribute():
    model, _ = onnx_prune.prune(fixture_path("depthwise"), ratio=0.5)
    dw = next(n for n in model.graph.node if n.op_type == "Conv" and
              onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "group")) > 1
              if any(a.name == "group" for a in n.attribute))
    group = onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group"))
    weight = next(t for t in model.graph.initializer if t.name == dw.input[1])
    assert weight.dims[0] == group and weight.dims[1] == 1 and group == 8


def test_flatten_into_gemm_removes_whole_blocks():
    model, _ = onnx_prune.prune(fixture_path("flatten_gemm"), ratio=0.5)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    assert list(weight.dims) == [10, 2 * 16]  # 2 of 4 channels kept, 16 positions each


def test_channel_shuffle_is_followed_not_frozen():
    prepared = prepare(fixture_path("channel_shuffle"))
    for group in prepared.analysis.groups:
        if group.name != "fc":  # only guards: each half the Split/Slices cut keeps one channel
            assert all("never lose all their channels" in r for r in group.reasons), group.reasons
            assert group.prunable >= group.size - 3


@pytest.mark.parametrize("name, node, words", [
    ("unknown_op", "conv1", "LRN node 'lrn0' is not understood"),
    ("if_subgraph", "conv0", "subgraph of If node"),
    ("loop_subgraph", "conv0", "Loop node"),
    ("pad_channel", "conv1", "padding channel"),
])
def test_frozen_spaces_say_why(name, node, words):
    group = _group_of(prepare(fixture_path(name)), node)
    assert any(words in r for r in group.reasons), group.reasons


def test_pad_on_channels_keeps_padding_and_prunes_the_rest():
    prepared = prepare(fixture_path("pad_channel"))
    group = _group_of(prepared, "conv1")
    # 8 padding channels, and one of conv0's 8 so that conv0 (which holds only those 8) is never emptied
    assert group.frozen.sum() == 9 and group.prunable == 7
    assert any("never lose all their channels" in r for r in group.reasons)
    model, _ = onnx_prune.prune(prepared, ratio=0.9)
    assert next(t for t in model.graph.initializer if t.name == "conv0.weight").dims[0] == 1


def test_grouped_conv_prunes_the_same_positions_in_every_group():
    prepared = prepare(fixture_path("grouped_conv"))
    model, _ = onnx_prune.prune(prepared, ratio=0.5)
    conv = next(n for n in model.graph.node if n.name == "conv1")
    assert onnx.helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 2
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    assert list(weight.dims[:2]) == [4, 2]


def test_constant_node_weights_are_pruned():
    model, report = onnx_prune.prune(fixture_path("constant_weights"), ratio=0.5)
    assert report.channels_after < report.channels_before
    assert not any(n.op_type == "Constant" for n in model.graph.node)


def test_shared_weight_is_one_member():
    prepared = prepare(fixture_path("shared_weight"))
    shared = [k for k in prepared.analysis.param_ids if k[1] == 0]
    assert len(shared) == len(set(shared))
    model, _ = onnx_prune.prune(fixture_path("shared_weight"), ratio=0.5)
    onnx.checker.check_model(model, full_check=True)


def test_pruning_is_deterministic():
    a, _ = onnx_prune.prune(fixture_path("channel_shuffle"), ratio=0.4, seed=3)
    b, _ = onnx_prune.prune(fixture_path("channel_shuffle"), ratio=0.4, seed=3)
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("name", ["residual_add", "depthwise", "se", "constant_weights", "opset21"])
def test_fold_batchnorm_keeps_the_function(name):
    from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass

    prepared = prepare(fixture_path(name))
    result = FoldBatchNormPass()(prepared.model)
    assert result.modified
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds_for(prepared.model)
    assert relative_error(run(prepared.model, feeds), run(result.model, feeds)) < 1e-5


def test_merge_matrix_averages_duplicate_producers_exactly():
    """A centroid merge: kept row = mean of two identical rows, consumers sum both columns."""
    prepared = prepare(fixture_path("flatten_gemm"))
    group = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    duplicated = duplicate_model(prepared, group, 0, 2)
    keep = np.array([0, 1, 3])
    fold = np.eye(4)[:, keep]
    fold[2, 0] = 1.0
    merge = np.eye(4)[:, keep]
    merge[[0, 2], 0] = 0.5
    plan = Plan({group.id: GroupPlan(keep, fold, merge)})
    merged = ApplyPlanPass(prepared.analysis, plan)(duplicated).model
    feeds = feeds_for(prepared.model)
    assert relative_error(run(duplicated, feeds), run(merged, feeds)) < 1e-5
    assert Plan.from_json(plan.to_json()).groups[group.id].merge.tolist() == merge.tolist()


def _with_open_spatial_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return out


@pytest.mark.parametrize("open_dims", [False, True])
def test_tf_same_pads_computed_from_shape_are_followed(open_dims):
    """Pads computed at run time from Shape (TF "SAME") pad H and W only: the channel amounts are constant
    zeros whatever the input size and channel counts, so the convs around them stay prunable."""
    model = onnx.load(str(fixture_path("tf_same_padding")))
    if open_dims:
        model = _with_open_spatial_dims(model)
    prepared = prepare(model)
    for producer in ("conv0", "conv2"):
        group = _group_of(prepared, producer)
        assert group.prunable == group.size and not group.reasons, group.reasons
    chosen = zero_channels_choice(prepared)
    zeroed = zero_model(prepared, chosen)
    pruned, _ = onnx_prune.prune(zeroed, ratio=0.3, criterion="l1")
    onnx.checker.check_model(pruned, full_check=True)
    depthwise = next(n for n in pruned.graph.node if n.name == "conv1")
    assert onnx.helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) < 8
    rng = np.random.default_rng(0)
    sizes = [(8, 8), (9, 11), (5, 6)] if open_dims else [(8, 8)]
    for h, w in sizes:  # the computed pads still follow the input size after pruning
        feeds = [{"x": rng.standard_normal((2, 3, h, w)).astype(np.float32)}]
        assert relative_error(run(zeroed, feeds), run(pruned, feeds)) < 1e-4
