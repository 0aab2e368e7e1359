"""Pass contracts (requires -> call -> ensures), PassResult details, Sequential, and the passes built on them:
BatchNorm folding (grouped ConvTranspose included), weight hashing, uneven depthwise separation."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.passes.base import (Pass, PassContractError, PassResult, PostconditionError, PreconditionError,
                                    Sequential, copy_model)
from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass
from onnx_prune.passes.hashing import HashWeightsPass
from onnx_prune.passes.uneven_depthwise import SeparateDepthwisePass

from invariants import feeds_for, relative_error, run

RNG = np.random.default_rng(0)


def _tensor(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_inits(prefix, channels, rng):
    return [_tensor(f"{prefix}.scale", rng.uniform(0.5, 2.0, channels)),
            _tensor(f"{prefix}.bias", rng.standard_normal(channels)),
            _tensor(f"{prefix}.mean", rng.standard_normal(channels)),
            _tensor(f"{prefix}.var", rng.uniform(0.1, 3.0, channels))]


def _bn(prefix, x, y, **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, **attrs)


def conv_bn_model(seed=0):
    """x -> Conv -> BN -> Relu -> y: the simplest model with a BN to fold."""
    rng = np.random.default_rng(seed)
    inits = [_tensor("w", rng.standard_normal((6, 3, 3, 3))), _tensor("b", rng.standard_normal(6))]
    inits += _bn_inits("bn", 6, rng)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _bn("bn", "c", "n"), helper.make_node("Relu", ["n"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def grouped_conv_transpose_model(group=2, c_in=4, per_group_out=3, bias=True):
    """x -> ConvTranspose(group) -> BN -> Relu -> y, and a second BN behind a Conv whose output has two readers
    (that BN cannot fold and must stay where it is)."""
    rng = np.random.default_rng(group)
    c_out = group * per_group_out
    inits = [_tensor("wt", rng.standard_normal((c_in, per_group_out, 3, 3)))]
    inputs = ["x", "wt"]
    if bias:
        inits.append(_tensor("bt", rng.standard_normal(c_out)))
        inputs.append("bt")
    inits += _bn_inits("bn_t", c_out, rng)
    inits += [_tensor("wc", rng.standard_normal((c_out, c_out, 1, 1)))] + _bn_inits("bn_c", c_out, rng)
    nodes = [helper.make_node("ConvTranspose", inputs, ["t"], name="deconv", group=group, strides=[2, 2]),
             _bn("bn_t", "t", "tn"), helper.make_node("Relu", ["tn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wc"], ["c"], name="conv"),
             _bn("bn_c", "c", "cn"), helper.make_node("Add", ["cn", "c"], ["y"], name="add")]  # `c` read twice
    graph = helper.make_graph(nodes, "grouped_deconv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 11, 11])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


# --- the contract machinery, each condition tripped by a deliberately broken pass

class CopyPass(Pass):
    """Does nothing, correctly."""
    def call(self, model):
        return PassResult(copy_model(model), False, {"copied": True})


class NeedsTwoOutputs(CopyPass):
    def requires(self, model):
        super().requires(model)
        if len(model.graph.output) != 2:
            raise PreconditionError("needs two outputs")


class DanglingInputPass(Pass):
    """Breaks the graph: a node reads a tensor nobody produces."""
    def call(self, model):
        out = copy_model(model)
        out.graph.node[0].input[0] = "nowhere"
        return PassResult(out, True)


class ReshapeOutputPass(Pass):
    """Changes the declared shape of the graph output."""
    def call(self, model):
        out = copy_model(model)
        out.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
        return PassResult(out, True)


class MutatingPass(Pass):
    """Edits its input in place."""
    def call(self, model):
        model.graph.node[0].name = "renamed"
        return PassResult(copy_model(model), True)


class ScaleWeightPass(Pass):
    """A weight-only rewrite that claims to keep the function but doubles a conv weight."""
    preserves_function = True

    def call(self, model):
        out = copy_model(model)
        tensor = next(t for t in out.graph.initializer if t.name == "w")
        tensor.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(tensor), "w"))
        return PassResult(out, True)


def test_a_correct_pass_returns_its_details():
    result = CopyPass()(conv_bn_model())
    assert result.details == {"copied": True} and not result.modified


@pytest.mark.parametrize("broken, error", [
    (NeedsTwoOutputs(), PreconditionError),
    (DanglingInputPass(), PostconditionError),
    (ReshapeOutputPass(), PostconditionError),
    (MutatingPass(), PostconditionError),
    (ScaleWeightPass(), PostconditionError),
])
def test_each_broken_contract_raises(broken, error):
    model = conv_bn_model()
    with pytest.raises(error):
        broken(model)
    assert issubclass(error, PassContractError)


def test_not_a_model_is_a_precondition_error():
    with pytest.raises(PreconditionError):
        CopyPass()("model.onnx")


def test_the_function_check_runs_only_for_passes_that_promise_it():
    class ScaleWithoutPromise(ScaleWeightPass):
        preserves_function = False

    model = conv_bn_model()
    changed = ScaleWithoutPromise()(model)  # allowed to change the function: only checker and shapes hold
    feeds = feeds_for(model)
    assert relative_error(run(model, feeds), run(changed.model, feeds)) > 0.1
    assert "function_check" not in changed.details


def test_sequential_composes_and_keys_details_by_pass_name():
    model = conv_bn_model()
    result = Sequential(FoldBatchNormPass(), CopyPass(), CopyPass())(model)
    assert result.modified
    assert list(result.details) == ["FoldBatchNormPass", "CopyPass", "CopyPass#2"]
    assert result.details["FoldBatchNormPass"]["folded"] == {"bn": "conv"}
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    with pytest.raises(PostconditionError):  # a broken step inside stops the sequence
        Sequential(CopyPass(), ScaleWeightPass())(model)


# --- FoldBatchNormPass

@pytest.mark.parametrize("group, bias", [(1, True), (2, True), (4, False)])
def test_fold_batchnorm_grouped_conv_transpose_keeps_outputs(group, bias):
    """Before the fix a grouped ConvTranspose's BN was rewired and deleted without being folded (relative
    error ~1).  Now it folds per output channel of each group, and the BN behind a twice-read output stays."""
    model = grouped_conv_transpose_model(group=group, bias=bias)
    result = FoldBatchNormPass()(model)
    assert result.details["folded"] == {"bn_t": "deconv"}
    assert set(result.details["kept"]) == {"bn_c"}
    assert [n.name for n in result.model.graph.node if n.op_type == "BatchNormalization"] == ["bn_c"]
    assert result.details["function_check"]["max_relative_error"] < 1e-5
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds_for(model)
    assert relative_error(run(model, feeds), run(result.model, feeds)) < 1e-5


def test_fold_batchnorm_leaves_an_unfoldable_batchnorm_wired_as_it_was():
    model = grouped_conv_transpose_model()
    result = FoldBatchNormPass()(model)
    kept = next(n for n in result.model.graph.node if n.name == "bn_c")
    original = next(n for n in model.graph.node if n.name == "bn_c")
    assert list(kept.input) == list(original.input) and list(kept.output) == list(original.output)
    conv = next(n for n in result.model.graph.node if n.name == "conv")
    assert list(conv.output) == ["c"]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert np.array_equal(weights["wc"], numpy_helper.to_array(next(t for t in model.graph.initializer
                                                                     if t.name == "wc")))


def test_fold_batchnorm_reports_nothing_to_do():
    model = conv_bn_model()
    once = FoldBatchNormPass()(model).model
    again = FoldBatchNormPass()(once)
    assert not again.modified and again.details == {"folded": {}, "kept": {}}


# --- HashWeightsPass and SeparateDepthwisePass: details instead of second entry points

def test_hash_details_count_distinct_values():
    model = conv_bn_model()
    result = HashWeightsPass(bandwidth=0.05)(model)
    layers = result.details["layers"]
    assert [layer["param"] for layer in layers] == ["w"]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert len(np.unique(weights["w"])) == layers[0]["after"] < layers[0]["before"] == 162
    assert result.details["distinct_after"] == layers[0]["after"]
    with pytest.raises(ValueError):
        HashWeightsPass(bandwidth=0.0)


def repeating_conv(n_in=8, n_out=24, per_channel=2, hw=16, seed=0):
    """A 3x3 conv whose every input channel holds only `per_channel` distinct kernels."""
    rng = np.random.default_rng(seed)
    kernels = rng.standard_normal((n_in, per_channel, 3, 3))
    choice = rng.integers(0, per_channel, (n_out, n_in))
    weight = kernels[np.arange(n_in)[None, :], choice]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="repeating", pads=[1, 1, 1, 1])], "repeating",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out, hw, hw])],
        [_tensor("w", weight), _tensor("b", rng.standard_normal(n_out))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_separation_is_decided_by_macs_and_deterministic():
    model = repeating_conv()
    first = SeparateDepthwisePass()(model)
    second = SeparateDepthwisePass()(model)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.details["decided_by"] == "macs" and "provider" not in first.details
    (decision,) = first.details["decisions"]
    assert decision["applied"] and decision["macs_after"] < decision["macs_before"]
    assert decision["latency_before_ms"] is None and decision["latency_after_ms"] is None
    assert first.details["function_check"]["max_relative_error"] < 1e-5


def test_measured_latency_is_opt_in_and_recorded():
    result = SeparateDepthwisePass(measure_latency=True, repeat=3, warmup=1)(repeating_conv())
    assert result.details["decided_by"] == "macs+latency" and result.details["provider"] == "cpu"
    (decision,) = result.details["decisions"]
    assert decision["latency_before_ms"] > 0 and decision["latency_after_ms"] > 0
    # what it decided is what the graph shows
    assert ("Gather" in [n.op_type for n in result.model.graph.node]) == decision["applied"]


# --- the other passes on the same base

def test_apply_plan_requires_the_analysis_of_this_model():
    from onnx_prune.passes.plan import GroupPlan, Plan
    from onnx_prune.passes.rewrite import ApplyPlanPass
    from onnx_prune.pipeline import prepare
    from conftest import fixture_path

    small = prepare(fixture_path("residual_add"))
    other = prepare(fixture_path("depthwise"))
    group = small.analysis.prunable_groups[0]
    rewrite = ApplyPlanPass(small.analysis, Plan({group.id: GroupPlan(np.arange(group.size - 1))}))
    assert rewrite(small.model).modified
    with pytest.raises(PreconditionError):
        rewrite(other.model)


@pytest.mark.parametrize("name", ["constant_weights", "nhwc_transpose", "shared_weight", "if_subgraph"])
def test_normalize_keeps_the_function(name):
    from onnx_prune.passes.normalize import NormalizeWeightsPass
    from conftest import fixture_path

    model = onnx.load(str(fixture_path(name)))
    normalized = NormalizeWeightsPass()(model).model
    feeds = feeds_for(model)
    assert relative_error(run(model, feeds), run(normalized, feeds)) < 1e-6


def test_hash_ensures_no_layer_gains_distinct_values():
    class NoisyHash(HashWeightsPass):
        """Broken on purpose: adds noise instead of hashing, and reports what it did."""
        def _hash_tensor(self, weight, axis):
            return weight + np.random.default_rng(0).standard_normal(weight.shape).astype(weight.dtype) * 1e-3

    model = conv_bn_model()
    model.graph.initializer[0].CopyFrom(_tensor("w", np.round(numpy_helper.to_array(model.graph.initializer[0]))))
    with pytest.raises(PostconditionError, match="more distinct values"):
        NoisyHash(bandwidth=0.05)(model)


def test_digest_covers_every_weight_and_the_graph(monkeypatch):
    import onnx_prune.passes.base as base

    model = conv_bn_model()
    large = base.model_digest(model)  # one path for every size: weights are fingerprinted one by one
    assert large == base.model_digest(copy_model(model))
    renamed = copy_model(model)
    renamed.graph.node[0].name += "_x"
    assert base.model_digest(renamed) != large
    monkeypatch.setattr(base, "DIRECT_CHECK_BYTES", 16)  # checks of larger models go through a weightless file
    changed = copy_model(model)
    changed.graph.initializer[0].CopyFrom(_tensor("w", numpy_helper.to_array(changed.graph.initializer[0]) + 1))
    assert base.model_digest(changed) != large
    with pytest.raises(PostconditionError):  # the mutation check works on that path too
        MutatingPass()(model)


# --- the onnx.checker step of the contracts, without the weights' bytes

class TruncatedWeightPass(Pass):
    """Cuts the last value off a weight's bytes (dims unchanged): the checker's data-size check must catch it."""
    def call(self, model):
        out = copy_model(model)
        tensor = next(t for t in out.graph.initializer if t.name == "w")
        tensor.raw_data = tensor.raw_data[:-4]
        return PassResult(out, True)


class TwoValueFieldsPass(Pass):
    """Leaves a weight with both raw_data and float_data."""
    def call(self, model):
        out = copy_model(model)
        next(t for t in out.graph.initializer if t.name == "w").float_data.append(1.0)
        return PassResult(out, True)


class DuplicateInitializerPass(Pass):
    """Adds a second initializer under an existing weight's name."""
    def call(self, model):
        out = copy_model(model)
        out.graph.initializer.append(out.graph.initializer[0])
        return PassResult(out, True)


def _weightless_checks(monkeypatch):
    """Every model goes through the stub path (all weights as stubs); returns what onnx.checker was handed."""
    import onnx_prune.passes.base as base

    monkeypatch.setattr(base, "DIRECT_CHECK_BYTES", 0)
    monkeypatch.setattr(base, "STUB_BYTES", 0)
    handed = []
    check = onnx.checker.check_model

    def spy(model, *args, **kwargs):
        handed.append(onnx.load(model, load_external_data=False) if isinstance(model, str) else model)
        return check(model, *args, **kwargs)

    monkeypatch.setattr(base.onnx.checker, "check_model", spy)
    return handed


@pytest.mark.parametrize("broken", [DanglingInputPass(), TruncatedWeightPass(), TwoValueFieldsPass(),
                                    DuplicateInitializerPass()])
def test_weightless_check_rejects_what_the_checker_rejects(monkeypatch, broken):
    """The contract's check sees stubs instead of weights, yet rejects a broken graph and broken weight data
    as onnx.checker on the whole model does."""
    model = conv_bn_model()
    with pytest.raises(onnx.checker.ValidationError):  # onnx.checker itself, on the whole result
        onnx.checker.check_model(broken.call(model).model)
    _weightless_checks(monkeypatch)
    with pytest.raises(PostconditionError, match="onnx.checker"):
        broken(model)


def test_weightless_check_hands_the_checker_no_weight_bytes(monkeypatch):
    handed = _weightless_checks(monkeypatch)
    model = conv_bn_model()
    result = CopyPass()(model)
    assert result.details == {"copied": True}
    assert handed, "the contract ran onnx.checker"
    for checked in handed:
        names = [t.name for t in checked.graph.initializer]
        assert names == [t.name for t in model.graph.initializer]
        for stub, tensor in zip(checked.graph.initializer, model.graph.initializer):
            assert not stub.raw_data and list(stub.dims) == list(tensor.dims)
            assert stub.data_location == onnx.TensorProto.EXTERNAL and stub.data_type == tensor.data_type
