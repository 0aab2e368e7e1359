"""Expected-activation compensation: moments against Monte-Carlo, channel statistics (BatchNorm, measured,
deterministic), the rewrite's bias folding (exact for constant channels) and that compensation lowers the error."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.analysis.expected import ACTIVATIONS, activation_moments, channel_statistics, synthetic_inputs
from onnx_prune.passes.compensate import compensate, lost_means
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import make_plan, prepare

from conftest import fixture_path
from invariants import feeds_for, relative_error, run, zero_channels_choice, zero_model

C = 6
CONSTANT = 2  # the channel made constant: BatchNorm gamma = 0, beta = BETA, after Relu
BETA = 3.0


# --- moments of activations under a Gaussian

MOMENT_CASES = [("Identity", {}), ("Relu", {}), ("Clip", {"min": 0.0, "max": 6.0}), ("Clip", {"min": -1.0, "max": 0.5}),
                ("LeakyRelu", {"alpha": 0.1}), ("PRelu", {"slope": np.array([0.1, 0.25, 0.5])}), ("Sigmoid", {}),
                ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}), ("HardSwish", {}), ("Swish", {}), ("Tanh", {}),
                ("Elu", {"alpha": 1.0}), ("Gelu", {}), ("Softplus", {}), ("Selu", {})]


@pytest.mark.parametrize("kind,params", MOMENT_CASES, ids=[f"{k}{i}" for i, (k, _) in enumerate(MOMENT_CASES)])
def test_activation_moments_match_monte_carlo(kind, params):
    mu, sigma = np.array([-0.5, 0.8, 2.5]), np.array([1.0, 0.7, 1.8])
    z = mu[:, None] + sigma[:, None] * np.random.default_rng(0).standard_normal((3, 4_000_000))
    values = ACTIVATIONS[kind](z, params)
    mean, var = activation_moments(kind, mu, sigma, params)
    mc_mean, mc_var = values.mean(axis=1), values.var(axis=1)
    assert np.all(np.abs(mean - mc_mean) <= 0.01 * np.maximum(np.abs(mc_mean), np.sqrt(mc_var))), (mean, mc_mean)
    assert np.all(np.abs(var - mc_var) <= 0.01 * mc_var), (var, mc_var)


def test_activation_moments_of_a_constant_are_exact():
    mean, var = activation_moments("Clip", [3.0, 7.5, -2.0], [0.0, 0.0, 0.0], {"min": 0.0, "max": 6.0})
    assert mean.tolist() == [3.0, 6.0, 0.0] and var.tolist() == [0.0, 0.0, 0.0]
    mean, var = activation_moments("Sigmoid", [0.0], [0.0])
    assert mean.tolist() == [0.5] and var.tolist() == [0.0]


# --- test models

def _t(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn_params(rng, prefix="", constant=(CONSTANT,)):
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(0.3, 0.5, C)
    gamma[list(constant)], beta[list(constant)] = 0.0, BETA
    return [_t(prefix + "g", gamma), _t(prefix + "b", beta), _t(prefix + "m", rng.normal(0, 0.2, C)),
            _t(prefix + "v", rng.uniform(0.5, 2.0, C))]


def _model(nodes, inits, out_shape, x_shape=(2, 3, 8, 8)):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_channel_model(consumer: str, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv (no bias) -> BN (channel CONSTANT: gamma 0, beta BETA) -> Relu -> consumer.  A grouped consumer
    ties in-group positions of both conv groups into one channel: both are made constant."""
    rng = np.random.default_rng(seed)
    constant = (CONSTANT, CONSTANT + C // 2) if consumer == "grouped_conv" else (CONSTANT,)
    inits = [_t("w1", rng.normal(0, 0.3, (C, 3, 3, 3)))] + _bn_params(rng, constant=constant)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu1")]
    if consumer == "conv_no_bias":
        inits.append(_t("w2", rng.normal(0, 0.3, (4, C, 3, 3))))
        nodes.append(helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
        return _model(nodes, inits, [2, 4, 6, 6])
    if consumer == "grouped_conv":
        inits += [_t("w2", rng.normal(0, 0.3, (4, C // 2, 1, 1))), _t("c2", rng.normal(0, 0.3, 4))]
        nodes.append(helper.make_node("Conv", ["r", "w2", "c2"], ["y"], group=2, name="conv2"))
        return _model(nodes, inits, [2, 4, 8, 8])
    if consumer == "gemm_flatten":
        inits += [_t("w2", rng.normal(0, 0.3, (5, C * 64))), _t("c2", rng.normal(0, 0.3, 5))]
        nodes += [helper.make_node("Flatten", ["r"], ["f"], name="flat"),
                  helper.make_node("Gemm", ["f", "w2", "c2"], ["y"], transB=1, alpha=0.7, beta=1.3, name="gemm")]
        return _model(nodes, inits, [2, 5])
    if consumer == "matmul_no_bias":
        inits.append(_t("w2", rng.normal(0, 0.3, (C, 5))))
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["f"], name="flat"),
                  helper.make_node("MatMul", ["f", "w2"], ["y"], name="mm")]
        return _model(nodes, inits, [2, 5])
    if consumer == "concat_offset":
        inits += [_t("w0", rng.normal(0, 0.3, (2, 3, 1, 1))), _t("w2", rng.normal(0, 0.3, (4, C + 2, 1, 1))),
                  _t("c2", rng.normal(0, 0.3, 4))]
        nodes += [helper.make_node("Conv", ["x", "w0"], ["o"], name="conv0"),
                  helper.make_node("Concat", ["o", "r"], ["cat"], axis=1, name="cat"),
                  helper.make_node("Conv", ["cat", "w2", "c2"], ["y"], name="conv2")]
        return _model(nodes, inits, [2, 4, 8, 8])
    raise ValueError(consumer)


def _group_of(prepared, producer):
    return next(g for g in prepared.analysis.groups if producer in g.nodes("producer"))


def _outputs(model, feeds):
    return run(model, feeds)


CONSUMERS = ["conv_no_bias", "grouped_conv", "gemm_flatten", "matmul_no_bias", "concat_offset"]


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_constant_channel_is_removed_with_unchanged_outputs(consumer):
    model = constant_channel_model(consumer)
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    channel = int(prepared.analysis.id_channel[prepared.analysis.layouts["c1"].ids[CONSTANT]])
    stats = channel_statistics(prepared)
    st = stats[group.id]
    assert st.deterministic[channel] and st.mean[channel] == pytest.approx(BETA, rel=1e-6)
    assert st.var[channel] == 0.0 and st.deterministic.sum() == 1
    removed = [channel]
    plan = Plan({group.id: GroupPlan(np.setdiff1d(np.arange(group.size), removed))})
    shifted = compensate(prepared, plan, stats)
    assert plan.groups[group.id].shift is None  # the input plan is not changed
    feeds = feeds_for(model, samples=3)
    reference = _outputs(model, feeds)
    plain = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    result = ApplyPlanPass(prepared.analysis, shifted)(prepared.model).model
    onnx.checker.check_model(result, full_check=True)
    after = _outputs(result, feeds)
    assert [o.shape for o in after] == [o.shape for o in reference]
    assert relative_error(reference, after) < 1e-5
    assert relative_error(reference, _outputs(plain, feeds)) > 1e-2  # without the shift the channel is missed
    assert prepared.model.SerializeToString() == prepare(model).model.SerializeToString()  # input untouched


def test_consumers_along_a_residual_stream_get_their_own_shift():
    """x1 = relu(bn1(conv1 x)), x2 = bn2(conv2 x1), s = x1 + x2; conv2 reads x1, conv3 reads s.  Channel CONSTANT
    is BETA in x1 and 1.5 in x2: conv2 must be shifted by BETA, conv3 by BETA + 1.5."""
    rng = np.random.default_rng(3)
    p2 = _bn_params(rng, "p")
    gamma2 = numpy_helper.to_array(p2[1]).copy()
    gamma2[CONSTANT] = 1.5
    p2[1] = _t("pb", gamma2)
    inits = [_t("w1", rng.normal(0, 0.3, (C, 3, 3, 3))), _t("w2", rng.normal(0, 0.3, (C, C, 1, 1))),
             _t("w3", rng.normal(0, 0.3, (4, C, 1, 1)))] + _bn_params(rng) + p2
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["x1"], name="relu1"),
             helper.make_node("Conv", ["x1", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "pg", "pb", "pm", "pv"], ["x2"], name="bn2"),
             helper.make_node("Add", ["x1", "x2"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w3"], ["y"], name="conv3")]
    model = _model(nodes, inits, [2, 4, 8, 8])
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    assert "conv2" in group.nodes("producer")  # tied through the Add
    stats = channel_statistics(prepared)
    plan = compensate(prepared, Plan({group.id: GroupPlan(np.setdiff1d(np.arange(C), [CONSTANT]))}), stats)
    gplan = plan.groups[group.id]
    assert gplan.shift_for("conv2")[CONSTANT] == pytest.approx(BETA)
    assert gplan.shift_for("conv3")[CONSTANT] == pytest.approx(BETA + 1.5)
    feeds = feeds_for(model)
    result = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    assert relative_error(run(model, feeds), run(result, feeds)) < 1e-5
    one_shift = Plan({group.id: GroupPlan(gplan.keep, shift=gplan.shift_for("conv2"))})
    wrong = ApplyPlanPass(prepared.analysis, one_shift)(prepared.model).model
    assert relative_error(run(model, feeds), run(wrong, feeds)) > 1e-3


@pytest.mark.parametrize("name", ["residual_add", "concat", "se", "depthwise", "flatten_gemm", "grouped_conv",
                                  "channel_shuffle", "blazeface_block"])
def test_zero_channels_stay_exact_with_compensation(name):
    prepared = prepare(fixture_path(name))
    zeroed = zero_model(prepared, zero_channels_choice(prepared))
    plan, zp = make_plan(zeroed, ratio=0.3, criterion="l1", compensate=False)
    stats = channel_statistics(zp)
    shifted = compensate(zp, plan, stats)
    feeds = feeds_for(prepared.model)
    result = ApplyPlanPass(zp.analysis, shifted)(zp.model).model
    assert relative_error(run(zeroed, feeds), run(result, feeds)) < 1e-4


def test_zero_channel_carrying_a_nonzero_constant_is_compensated_exactly():
    """A zero-weight channel after Sigmoid carries sigmoid(bias) = const != 0 whatever BN running stats say."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.3, (C, 3, 1, 1))
    w1[1] = 0
    bias = rng.normal(0, 1, C)
    inits = [_t("w1", w1), _t("b1", bias), _t("w2", rng.normal(0, 0.3, (4, C, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2")]
    model = _model(nodes, inits, [2, 4, 8, 8])
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    stats = channel_statistics(prepared)
    assert stats[group.id].mean[1] == pytest.approx(1 / (1 + np.exp(-np.float32(bias[1]))), rel=1e-6)
    assert stats[group.id].deterministic.tolist() == [c == 1 for c in range(C)]
    plan = compensate(prepared, Plan({group.id: GroupPlan(np.setdiff1d(np.arange(C), [1]))}), stats)
    feeds = feeds_for(model)
    result = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    assert relative_error(run(model, feeds), run(result, feeds)) < 1e-5


# --- statistics: BatchNorm data-free, measured

def test_batchnorm_statistics_through_silu_and_hardswish_patterns_match_sampling():
    """Identity 1x1 conv -> BN -> {x * Sigmoid(x), x * HardSigmoid(x)}: with inputs drawn from the BN's running
    statistics, the BN output is N(beta, gamma^2) and the data-free means/variances are what sampling gives."""
    rng = np.random.default_rng(7)
    running_mean, running_var = rng.normal(0, 1, C), rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(0, 1, C)
    inits = [_t("eye", np.eye(C).reshape(C, C, 1, 1)), _t("g", gamma), _t("b", beta), _t("m", running_mean),
             _t("v", running_var), _t("w2", rng.normal(0, 0.3, (4, 2 * C, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "eye"], ["c"], name="conv1"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["z"], epsilon=0.0, name="bn"),
             helper.make_node("Sigmoid", ["z"], ["sg"], name="sig"),
             helper.make_node("Mul", ["z", "sg"], ["silu"], name="silu"),
             helper.make_node("HardSigmoid", ["z"], ["hs"], alpha=1 / 6, beta=0.5, name="hsig"),
             helper.make_node("Mul", ["z", "hs"], ["hswish"], name="hswish"),
             helper.make_node("Concat", ["silu", "hswish"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv2")]
    model = _model(nodes, inits, [1, 4, 1, 1], x_shape=(1, C, 1, 1))
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    st = channel_statistics(prepared)[group.id]
    assert st.source == "bn"
    x = running_mean + np.sqrt(running_var) * rng.standard_normal((400_000, C))
    z = gamma * (x - running_mean) / np.sqrt(running_var) + beta
    read = st.reads["conv2"]
    # the group's channel c appears twice in the Concat (silu and hardswish of the same channel)
    silu, hswish = z / (1 + np.exp(-z)), z * np.clip(z / 6 + 0.5, 0, 1)
    both = np.concatenate([silu, hswish])
    assert np.allclose(read.mean, both.mean(axis=0), rtol=0.02, atol=0.01)
    assert np.allclose(read.var, both.var(axis=0), rtol=0.03)


def test_measured_statistics_without_batchnorm():
    rng = np.random.default_rng(11)
    inits = [_t("w1", rng.normal(0, 0.3, (C, 3, 3, 3))), _t("b1", rng.normal(0.5, 0.5, C)),
             _t("w2", rng.normal(0, 0.3, (4, C, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits += [_t("lo", 0.0), _t("hi", 6.0)]
    model = _model(nodes, inits, [8, 4, 30, 30], x_shape=(8, 3, 32, 32))
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    propagated = channel_statistics(prepared)[group.id]  # default: moments pushed from normalised inputs
    assert propagated.source == "propagated" and propagated.reads["conv2"].activated
    taps = numpy_helper.to_array(inits[0]).astype(np.float64).sum(axis=(2, 3))
    bias = numpy_helper.to_array(inits[1]).astype(np.float64)
    expected_mean, expected_var = activation_moments("Clip", bias, np.sqrt((taps ** 2).sum(axis=1)),
                                                     {"min": 0.0, "max": 6.0})
    assert np.allclose(propagated.mean, expected_mean) and np.allclose(propagated.var, expected_var)
    synthetic = channel_statistics(prepared, samples=16, estimate="synthetic")[group.id]
    assert synthetic.source == "synthetic" and not synthetic.deterministic.any()
    feeds = synthetic_inputs(model, samples=16)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="r"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = np.concatenate([session.run(["r"], f)[0] for f in feeds])
    assert np.allclose(synthetic.mean, values.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert np.allclose(synthetic.var, values.var(axis=(0, 2, 3)), rtol=1e-4)
    calib = [{"x": rng.normal(2.0, 1.0, (8, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    measured = channel_statistics(prepared, calib=calib)[group.id]
    values = np.concatenate([session.run(["r"], f)[0] for f in calib])
    assert measured.source == "measured"
    assert np.allclose(measured.mean, values.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert not np.allclose(measured.mean, synthetic.mean, rtol=0.05)


def test_synthetic_images_have_a_pink_spectrum_and_the_input_normalisation():
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [], [4, 3, 64, 64], x_shape=(4, 3, 64, 64))
    feeds = synthetic_inputs(model, samples=8, batch=4, seed=0)
    assert len(feeds) == 2 and feeds[0]["x"].shape == (4, 3, 64, 64)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    pixels = x * np.array([0.229, 0.224, 0.225])[None, :, None, None] + np.array([0.485, 0.456, 0.406])[None, :, None, None]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # valid images in [0, 1] before normalisation
    power = np.abs(np.fft.rfft2(x - x.mean(axis=(2, 3), keepdims=True))) ** 2
    low, high = power[..., 1:4, 1:4].mean(), power[..., 16:32, 16:32].mean()
    assert low > 50 * high  # 1/f^2 power: most energy at low frequencies (white noise: ratio 1)
    assert np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1] > 0.6  # colour planes move together
    again = synthetic_inputs(model, samples=8, batch=4, seed=0)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again))


# --- compensation lowers the error; plan round trip; merges

def large_mean_model(seed: int = 0) -> onnx.ModelProto:
    """Conv with large positive biases -> Relu -> Conv -> Relu -> Gemm: channels carry large means."""
    rng = np.random.default_rng(seed)
    inits = [_t("w1", rng.normal(0, 0.2, (16, 3, 3, 3))), _t("b1", rng.uniform(1.0, 3.0, 16)),
             _t("w2", rng.normal(0, 0.2, (16, 16, 3, 3))), _t("b2", rng.uniform(0.5, 2.0, 16)),
             _t("w3", rng.normal(0, 0.2, (10, 16 * 16))), _t("b3", np.zeros(10))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc")]
    return _model(nodes, inits, [2, 10])


def test_compensation_strictly_lowers_the_error_on_channels_with_large_means():
    model = large_mean_model()
    plan, prepared = make_plan(model, ratio=0.5, criterion="l2", compensate=False)
    feeds = synthetic_inputs(model, samples=8, seed=1)  # fresh images, not the ones the means came from
    reference = run(model, feeds)
    plain_error = relative_error(reference, run(ApplyPlanPass(prepared.analysis, plan)(prepared.model).model, feeds))
    for estimate, margin in (("synthetic", 0.5), ("propagate", 0.75)):  # measured on the images' kind: closer
        stats = channel_statistics(prepared, samples=16, estimate=estimate)
        assert {stats[g].source for g in plan.groups} == {"synthetic" if estimate == "synthetic" else "propagated"}
        shifted = compensate(prepared, plan, stats)
        shifted_error = relative_error(reference,
                                       run(ApplyPlanPass(prepared.analysis, shifted)(prepared.model).model, feeds))
        assert shifted_error < margin * plain_error, (estimate, shifted_error, plain_error)


def test_plan_with_shift_round_trips_through_json():
    plan = Plan({0: GroupPlan([0, 2], shift=[0.0, 1.25, 0.0], consumer_shift={"conv": [0.0, -3.5, 0.0]}),
                 1: GroupPlan([1])})
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert again.groups[0].shift_for("conv").tolist() == [0.0, -3.5, 0.0]
    assert again.groups[0].shift_for("other").tolist() == [0.0, 1.25, 0.0]
    assert again.groups[1].shift is None
    with pytest.raises(ValueError):
        GroupPlan([0], shift=[np.nan, 1.0])


def test_lost_means_for_pruning_and_merging():
    mean = np.array([1.0, 2.0, 4.0, np.nan])
    prune = np.eye(4)[:, [0, 2]]
    assert lost_means(mean, prune, prune).tolist() == [0.0, 2.0, 0.0, 0.0]  # removed: its mean; unknown: 0
    # channels 0 and 1 merged into their average (centripetal): each loses its distance to the average
    merge = np.array([[0.5, 0], [0.5, 0], [0, 1], [0, 0]])
    fold = np.array([[1.0, 0], [1.0, 0], [0, 1], [0, 0]])
    assert lost_means(mean, fold, merge).tolist() == [-0.5, 0.5, 0.0, 0.0]
    # identical channels merged: nothing is lost, so exact merges stay exact
    same = np.array([3.0, 3.0, 4.0, 1.0])
    assert lost_means(same, fold, merge).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_estimated_means_of_linear_streams_are_not_compensated_but_constants_are():
    """Without BatchNorm or data, a channel no activation produced keeps no shift (its estimated mean is mostly
    error); a deterministic one still gets its exact value, and BatchNorm statistics are always used."""
    rng = np.random.default_rng(13)
    w1 = rng.normal(0, 0.3, (C, 3, 3, 3))
    w1[4] = 0
    inits = [_t("w1", w1), _t("b1", rng.normal(1.0, 0.5, C)), _t("w2", rng.normal(0, 0.3, (4, C, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Conv", ["c1", "w2"], ["y"], name="conv2")]
    model = _model(nodes, inits, [2, 4, 8, 8])
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    stats = channel_statistics(prepared)
    read = stats[group.id].reads["conv2"]
    assert read.source == "propagated" and not read.activated
    plan = compensate(prepared, Plan({group.id: GroupPlan(np.array([0, 2, 3, 5]))}), stats)
    shift = plan.groups[group.id].shift
    assert shift[1] == 0.0 and shift[4] == pytest.approx(float(numpy_helper.to_array(inits[1])[4]))
    measured = channel_statistics(prepared, calib=feeds_for(model))
    assert compensate(prepared, Plan({group.id: GroupPlan(np.array([0, 2, 3, 5]))}), measured).groups[
        group.id].shift[1] != 0.0  # measured means are trusted


def test_a_method_that_folds_batchnorm_still_gets_the_batchnorm_statistics():
    """Centripetal and RED fold BatchNorm before their analysis; the statistics of what the consumers read (the
    same function, so the same moments) come from the model before folding: source "bn", the values of the
    unfolded model, not the weaker "propagated" estimate of a BN-fused export."""
    from onnx_prune.analysis.criteria import Scoring
    from onnx_prune.pipeline import prepare_folded

    model = constant_channel_model("conv_no_bias", seed=4)
    folded, unfolded = prepare_folded(model), prepare(model)
    group, twin = _group_of(folded, "conv1"), _group_of(unfolded, "conv1")
    assert not any(n.op_type == "BatchNormalization" for n in folded.model.graph.node)
    stats = Scoring.for_prepared(folded).group_statistics(group.id)
    expected = channel_statistics(unfolded, [twin.id])[twin.id]
    assert stats.source == expected.source == "bn"
    assert np.array_equal(stats.mean, expected.mean) and np.array_equal(stats.var, expected.var)
    assert stats.group == group.id and set(stats.reads) == {"conv2"}
    # a model prepared without folding is untouched: its own statistics
    assert Scoring.for_prepared(unfolded).group_statistics(twin.id).source == "bn"


# --- variance restoration

def gaussian_channels_model(consumer_gain=None, twins=(), seed: int = 7) -> onnx.ModelProto:
    """x (C channels of N(0, 1)) -> Conv 1x1, channel c = a_c x_c (independent channels) -> BatchNorm whose
    running statistics are the true ones (mean 0, var a_c^2), so its output is exactly N(beta_c, gamma_c^2) ->
    Relu -> Conv 1x1 with bias (the consumer).  `twins`: pairs (c, d) made identical (channel d reads x_c with
    c's weight and BatchNorm parameters): an exact merge."""
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(0.3, 0.5, C)
    w1 = np.zeros((C, C, 1, 1))
    w1[np.arange(C), np.arange(C), 0, 0] = gain
    for c, d in twins:
        w1[d] = w1[c]
        gain[d], gamma[d], beta[d] = gain[c], gamma[c], beta[c]
    w2 = rng.normal(0, 0.5, (4, C, 1, 1)) if consumer_gain is None else consumer_gain
    inits = [_t("w1", w1), _t("g", gamma), _t("b", beta), _t("m", np.zeros(C)), _t("v", gain ** 2),
             _t("w2", w2), _t("c2", rng.normal(0, 0.3, 4))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], epsilon=1e-9, name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2", "c2"], ["y"], name="conv2")]
    return _model(nodes, inits, [2, 4, 32, 32], x_shape=(2, C, 32, 32))


def _gaussian_feeds(samples: int, seed: int = 11) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, C, 32, 32)).astype(np.float32)} for _ in range(samples)]


def _per_output_moments(model, feeds) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel of `model`: mean and variance over batch and pixels."""
    y = run(model, feeds)[0]
    values = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1).astype(np.float64)
    return values.mean(axis=1), values.var(axis=1)


def _channel_of_position(prepared, tensor: str, position: int) -> int:
    return int(prepared.analysis.id_channel[prepared.analysis.layouts[tensor].ids[position]])


def test_restored_pruning_keeps_the_consumer_output_variance_and_mean():
    """Independent Gaussian channels through Relu, a 1x1 consumer: the variance the consumer's outputs carry is
    sum_c ||W[:, c]||^2 Var[x_c] exactly, so scaling the kept channels by sqrt(all / kept) restores the summed
    output variance (Monte-Carlo on the rewritten ONNX model), and compensation keeps every output's mean."""
    from onnx_prune.passes.compensate import RESTORE_CAP, compensation_summary, restore_variance

    model = gaussian_channels_model()
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    stats = channel_statistics(prepared)
    assert stats[group.id].source == "bn"
    removed = [_channel_of_position(prepared, "c1", p) for p in (0, 3)]
    plan = Plan({group.id: GroupPlan(np.setdiff1d(np.arange(C), removed))})
    restored, scales = restore_variance(prepared, plan, stats)
    assert plan.groups[group.id].fold is None  # the input plan is not changed
    # the scale from the BatchNorm moments and the consumer weights, by hand
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    _, var = activation_moments("Relu", init["b"], init["g"])
    energy = (init["w2"][:, :, 0, 0] ** 2).sum(axis=0)
    kept_positions = [p for p in range(C) if p not in (0, 3)]
    expected = np.sqrt((energy * var).sum() / (energy * var)[kept_positions].sum())
    assert 1.05 < expected < RESTORE_CAP and scales[group.id] == pytest.approx(expected, rel=1e-6)
    shifted = compensate(prepared, restored, stats)
    summary = compensation_summary(shifted, stats, scales)
    assert summary[group.id]["variance_scale"] == scales[group.id]
    result = ApplyPlanPass(prepared.analysis, shifted)(prepared.model).model
    onnx.checker.check_model(result, full_check=True)
    unrestored = ApplyPlanPass(prepared.analysis, compensate(prepared, plan, stats))(prepared.model).model
    feeds = _gaussian_feeds(10)  # 20480 samples per channel
    mean0, var0 = _per_output_moments(model, feeds)
    mean1, var1 = _per_output_moments(result, feeds)
    mean2, var2 = _per_output_moments(unrestored, feeds)
    assert run(result, feeds[:1])[0].shape == run(model, feeds[:1])[0].shape
    assert var1.sum() == pytest.approx(var0.sum(), rel=0.03)
    assert var2.sum() == pytest.approx(var0.sum() / expected ** 2, rel=0.03)  # without: the removed share missing
    assert np.abs(mean1 - mean0).max() < 0.03 * np.sqrt(var0).max()  # compensation: the means stay
    assert np.abs(mean2 - mean0).max() < 0.03 * np.sqrt(var0).max()


def test_restoration_is_capped():
    from onnx_prune.passes.compensate import RESTORE_CAP, restore_variance

    prepared = prepare(gaussian_channels_model())
    group = _group_of(prepared, "conv1")
    stats = channel_statistics(prepared)
    plan = Plan({group.id: GroupPlan(np.array([_channel_of_position(prepared, "c1", 5)]))})
    free = restore_variance(prepared, plan, stats, cap=100.0)[1][group.id]
    assert free > 2.0 > RESTORE_CAP  # one channel of six carries the group's variance: a large scale uncapped
    restored, scales = restore_variance(prepared, plan, stats)
    assert scales[group.id] == RESTORE_CAP
    assert np.array_equal(restored.groups[group.id].fold, np.eye(C)[:, plan.groups[group.id].keep] * RESTORE_CAP)


def test_restoration_off_or_without_trusted_variances_changes_nothing():
    """Restoration is off by default (the default run's bytes are those of restore_variance=False); on a
    BatchNorm-kept model it changes the output;
    on a model without BatchNorm and without data (estimated variances) it changes nothing."""
    from onnx_prune import prune

    model = gaussian_channels_model()
    default = prune(model, ratio=0.34, compensate=True)[0].SerializeToString()
    off = prune(model, ratio=0.34, restore_variance=False)[0].SerializeToString()
    on, report = prune(model, ratio=0.34, restore_variance=True)
    assert default == off and on.SerializeToString() != off
    assert any(g.get("variance_scale", 1.0) > 1.0 for g in report.details["compensation"].values())
    onnx.checker.check_model(on, full_check=True)
    no_bn = large_mean_model()
    plain = prune(no_bn, ratio=0.5)[0].SerializeToString()
    restored, report = prune(no_bn, ratio=0.5, restore_variance=True)
    assert restored.SerializeToString() == plain
    assert not any("variance_scale" in g for g in report.details.get("compensation", {}).values())


def test_restoration_without_compensation_is_refused():
    from onnx_prune import prune
    from onnx_prune.errors import PruneError

    with pytest.raises(PruneError, match="restore.variance scales.*compensat"):
        prune(gaussian_channels_model(), ratio=0.34, restore_variance=True, compensate=False)


def test_an_exact_merge_stays_exact_with_restoration():
    """Two identical channels merged (centroid rows, summed consumer columns): nothing is lost, so the scale is
    1, the plan unchanged and the outputs exact; merging two different channels restores something (s > 1)."""
    from onnx_prune.passes.compensate import restore_variance
    from onnx_prune.passes.merge import cluster_plan

    model = gaussian_channels_model(twins=[(1, 4)])
    prepared = prepare(model)
    group = _group_of(prepared, "conv1")
    a, b = _channel_of_position(prepared, "c1", 1), _channel_of_position(prepared, "c1", 4)
    stats = channel_statistics(prepared)
    labels = np.arange(C)
    labels[max(a, b)] = min(a, b)
    merged = cluster_plan(labels, group.frozen, average=True)
    plan = Plan({group.id: merged})
    restored, scales = restore_variance(prepared, plan, stats)
    assert scales[group.id] == 1.0 and restored.groups[group.id] is merged
    result = ApplyPlanPass(prepared.analysis, compensate(prepared, restored, stats))(prepared.model).model
    onnx.checker.check_model(result, full_check=True)
    feeds = _gaussian_feeds(2)
    assert relative_error(run(model, feeds), run(result, feeds)) < 1e-5
    # channels 0 and 2 are different: their centroid carries less than both did
    other = np.arange(C)
    c0, c2 = _channel_of_position(prepared, "c1", 0), _channel_of_position(prepared, "c1", 2)
    other[max(c0, c2)] = min(c0, c2)
    _, scales = restore_variance(prepared, Plan({group.id: cluster_plan(other, group.frozen, average=True)}), stats)
    assert scales[group.id] > 1.0


def test_residual_fraction_of_pruning_and_merging():
    """Rows rebuilt as fold merge^T R: a removed channel loses all, a kept one nothing, the members of a centroid
    of two orthogonal rows of equal norm half each; a carrier keeps what the producer left."""
    from onnx_prune.analysis.criteria import FilterSet
    from onnx_prune.passes.compensate import residual_fraction

    rows = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0]])
    producer = FilterSet("p", "producer", rows, np.arange(3), np.arange(3))
    keep = np.eye(3)[:, [0, 2]]
    assert residual_fraction({"producer": [producer], "carrier": []}, keep, keep, 3).tolist() == [0.0, 1.0, 0.0]
    fold = np.array([[1.0, 0], [1.0, 0], [0, 1.0]])
    merge = np.array([[0.5, 0], [0.5, 0], [0, 1.0]])
    assert residual_fraction({"producer": [producer], "carrier": []}, fold, merge, 3) == pytest.approx([0.5, 0.5, 0])
    carrier = FilterSet("d", "carrier", np.array([[2.0, 0], [2.0, 0], [1.0, 0]]), np.arange(3), np.arange(3))
    assert residual_fraction({"producer": [producer], "carrier": [carrier]}, fold, merge, 3) == \
        pytest.approx([0.5, 0.5, 0])  # identical carriers: no further loss
    carrier.rows[1, 0] = -2.0  # opposite depthwise scales: the centroid's carrier is 0, all is lost
    assert residual_fraction({"producer": [producer], "carrier": [carrier]}, fold, merge, 3) == \
        pytest.approx([1.0, 1.0, 0])


@pytest.mark.parametrize("name", ["residual_add", "concat", "se", "depthwise", "flatten_gemm", "grouped_conv",
                                  "channel_shuffle", "blazeface_block"])
def test_zero_channels_stay_exact_with_restoration(name):
    """Measured statistics (trusted: restoration runs): the zero channels removed carry no variance, so every
    scale is 1 and the outputs stay exact."""
    from onnx_prune.passes.compensate import restore_variance

    prepared = prepare(fixture_path(name))
    zeroed = zero_model(prepared, zero_channels_choice(prepared))
    plan, zp = make_plan(zeroed, ratio=0.3, criterion="l1", compensate=False)
    feeds = feeds_for(prepared.model)
    stats = channel_statistics(zp, calib=feeds_for(prepared.model, seed=3, samples=4))
    restored, scales = restore_variance(zp, plan, stats)
    assert scales and set(scales.values()) == {1.0}
    result = ApplyPlanPass(zp.analysis, compensate(zp, restored, stats))(zp.model).model
    assert relative_error(run(zeroed, feeds), run(result, feeds)) < 1e-4


def test_restore_variance_from_the_command_line(tmp_path):
    """--restore-variance reaches the pipeline (generated flag): the report gives each restored group's scale."""
    import json

    from onnx_prune.cli import main

    source, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(gaussian_channels_model(), source)
    assert main([str(source), str(out), "--ratio", "0.34", "--restore-variance", "--report", str(report),
                 "--quiet"]) == 0
    scales = [g["variance_scale"] for g in json.loads(report.read_text())["details"]["compensation"].values()]
    assert scales and max(scales) > 1.0
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize("name", ["channel_shuffle", "concat", "depthwise", "flatten_gemm", "grouped_conv", "se"])
def test_restoration_with_scales_above_one_keeps_every_topology_valid(name, tmp_path):
    """Measured variances (a --calib file) make real scales (> 1) through Concat, Flatten -> Gemm, grouped and
    depthwise convs, channel shuffles and SE gates: the result is a valid model of the original's output shapes,
    and the report names the scales it applied."""
    from onnx_prune import prune

    model = onnx.load(fixture_path(name))
    feeds = feeds_for(model, seed=3, batch=4, samples=8)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    pruned, report = prune(model, ratio=0.5, method="prune", calib=str(calib), restore_variance=True,
                           allocation="uniform", progress=False)
    onnx.checker.check_model(pruned, full_check=True)
    scales = [g["variance_scale"] for g in report.details["compensation"].values() if "variance_scale" in g]
    assert scales and max(scales) > 1.0
    for ours, theirs in zip(run(pruned, feeds[:1]), run(model, feeds[:1])):
        assert ours.shape == theirs.shape
