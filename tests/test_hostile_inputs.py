"""Hostile and unusual inputs (issue 11): one regression test per defect, each on a small model built here.

Every test failed on the code before its fix (commit 94de335); the comment above each says how.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_prune
from onnx_prune.errors import InvalidResultError, OutputPathError, PruneError
from onnx_prune.runtime import io
from onnx_prune.runtime.cost import count_cost

from conftest import fixture_path
from invariants import feeds_for, relative_error, run

F32 = TensorProto.FLOAT


def _chain(widths=(3, 8, 8), opset=13, batch="N", spatial=(8, 8), name="chain") -> onnx.ModelProto:
    """x -> (Conv 3x3 -> Relu) per width step -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = "x"
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [h, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        h = f"r{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((4, widths[-1])).astype(np.float32), "fc.w")]
    nodes += [helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", F32, [batch, widths[0], *spatial])],
                              [helper.make_tensor_value_info("logits", F32, [batch, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _save_external(model: onnx.ModelProto, path, location: str) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


# --- 1. the input is destroyed through external-data names
# Before: refuse_overwrite compared OUT with IN and OUT.data with IN.data only, so both saves below went ahead
# and left an input that no longer loads.

def test_output_model_may_not_be_the_inputs_data_file(tmp_path):
    shutil.copy(fixture_path("external_data"), tmp_path / "m.onnx")
    shutil.copy(fixture_path("external_data").with_suffix(".onnx.data"), tmp_path / "external_data.onnx.data")
    data = tmp_path / "external_data.onnx.data"
    before = data.read_bytes()
    pruned, _ = onnx_prune.prune(tmp_path / "m.onnx", ratio=0.3)
    with pytest.raises(OutputPathError, match="external data"):
        io.save(pruned, data, input_path=tmp_path / "m.onnx")
    assert data.read_bytes() == before
    onnx_prune.load(tmp_path / "m.onnx")


def test_input_data_named_like_the_outputs_data_file(tmp_path):
    _save_external(_chain(), tmp_path / "in.onnx", "out.onnx.data")  # the input reads out.onnx.data
    before = (tmp_path / "out.onnx.data").read_bytes()
    pruned, _ = onnx_prune.prune(tmp_path / "in.onnx", ratio=0.3)
    with pytest.raises(OutputPathError, match="external data"):
        io.save(pruned, tmp_path / "out.onnx", input_path=tmp_path / "in.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_hard_link_to_the_input_is_refused(tmp_path):
    onnx.save(_chain(), str(tmp_path / "in.onnx"))
    os.link(tmp_path / "in.onnx", tmp_path / "alias.onnx")
    with pytest.raises(OutputPathError, match="input model"):
        io.check_output_paths(tmp_path / "in.onnx", tmp_path / "alias.onnx")


# --- 2. reports may overwrite anything
# Before: there was no check for report paths at all.

def test_report_paths_are_checked_against_inputs_and_outputs(tmp_path):
    _save_external(_chain(), tmp_path / "in.onnx", "weights.bin")
    out = tmp_path / "out.onnx"
    for report, words in ((tmp_path / "in.onnx", "input model"), (tmp_path / "weights.bin", "external data"),
                          (out, "same file"), (tmp_path / "out.onnx.data", "same file"),
                          (tmp_path / "missing" / "r.json", "does not exist"), (tmp_path, "folder")):
        with pytest.raises(OutputPathError, match=words):
            io.check_output_paths(tmp_path / "in.onnx", out, {"--report": report})
    io.check_output_paths(tmp_path / "in.onnx", out, {"--report": tmp_path / "r.json"})


# --- 6. external data depends on the working directory; two renames leave a stray OUT.data
# Before: onnx.save checked the data file name against the working directory (FileExistsError on a second run
# in the model's folder, or when an unrelated ./o.onnx.data existed), and a failed model rename left OUT.data.

def test_external_data_save_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    model = _chain()
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        io.save(model, "o.onnx", external_data=True)
    (tmp_path / "sub").mkdir()
    io.save(model, "sub/o.onnx", external_data=True)  # ./o.onnx.data exists and is unrelated
    feeds = feeds_for(model)
    for path in ("o.onnx", "sub/o.onnx"):
        onnx.checker.check_model(path, full_check=True)
        loaded = onnx.load(path)
        assert relative_error(run(model, feeds), run(loaded, feeds)) == 0.0
    assert sorted(os.listdir(tmp_path / "sub")) == ["o.onnx", "o.onnx.data"]


def test_failed_move_leaves_neither_model_nor_data(tmp_path, monkeypatch):
    model, out = _chain(), tmp_path / "o.onnx"
    real_replace = os.replace

    def replace(src, dst):  # the disk refuses the second of the two moves
        if str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        io.save(model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == []
    # with an earlier result in place, the earlier data file is put back
    monkeypatch.setattr(io.os, "replace", real_replace)
    io.save(model, out, external_data=True)
    earlier = (tmp_path / "o.onnx.data").read_bytes()
    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        io.save(_chain(widths=(3, 8, 16)), out, external_data=True)
    assert (tmp_path / "o.onnx.data").read_bytes() == earlier
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data"]


# --- 8. a killed save leaves .onnx-prune-*/ behind
# Before: the staging folder had no owner in its name and nothing removed it later.

def test_stale_staging_folders_of_dead_runs_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{io.STAGING_PREFIX}{dead.pid}-abc123"
    stale.mkdir()
    (stale / "o.onnx.data").write_bytes(b"partial")
    alive = tmp_path / f"{io.STAGING_PREFIX}{os.getppid()}-def456"  # a live process's folder stays
    alive.mkdir()
    io.save(_chain(), tmp_path / "o.onnx")
    assert not stale.exists() and alive.exists()


def test_interrupted_save_removes_its_staging_folder(tmp_path, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # what the CLI turns SIGINT and SIGTERM into

    monkeypatch.setattr(io, "_write_model_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save(_chain(), tmp_path / "o.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


# --- 12. OUT.data was written 0600 while OUT was 0644

def test_model_and_data_file_have_the_same_mode(tmp_path):
    out = io.save(_chain(), tmp_path / "o.onnx", external_data=True)
    modes = {os.stat(p).st_mode & 0o777 for p in (out, tmp_path / "o.onnx.data")}
    assert len(modes) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


# --- 13. every written model: no zero-sized dimension, loads in onnxruntime

def test_check_result_refuses_zero_sized_tensors_and_unloadable_models():
    model = _chain()
    io.check_result(model)
    empty = onnx.ModelProto()
    empty.CopyFrom(model)
    w = next(t for t in empty.graph.initializer if t.name == "w1")
    w.CopyFrom(numpy_helper.from_array(np.zeros((0, 8, 3, 3), np.float32), "w1"))
    with pytest.raises(InvalidResultError, match="zero-sized"):
        io.check_result(empty)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    w = next(t for t in broken.graph.initializer if t.name == "w1")
    w.CopyFrom(numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float64), "w1"))  # a double weight: type error
    with pytest.raises(InvalidResultError, match="onnxruntime"):
        io.check_result(broken, original=model)


# --- 9. generated node names shadowed explicit ones
# Before: an unnamed Conv (index 0) became "Conv_0" and the user's own "Conv_0" was renamed "Conv_0_1", so
# `exclude=["Conv_0"]` protected the wrong layer.

def test_user_node_names_are_never_changed():
    model = _chain(widths=(3, 8, 8, 8))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    convs[0].name = ""          # normalisation will name it after its op and index: "Conv_0"
    convs[1].name = "Conv_0"    # the user's own name for the second conv
    prepared = onnx_prune.prepare(model)
    names = [n.name for n in prepared.model.graph.node if n.op_type == "Conv"]
    assert names[1] == "Conv_0" and names[0] not in ("Conv_0", "") and len(set(names)) == 3
    pruned, _ = onnx_prune.prune(model, ratio=0.5, exclude=["Conv_0"])
    widths = {t.name: t.dims[0] for t in pruned.graph.initializer if t.name in ("w0", "w1", "w2")}
    assert widths["w1"] == 8 and widths["w0"] < 8  # the user's Conv_0 (the second conv) kept its channels


# --- 3. a weight that is also a graph output was pruned (the output changed shape)

def _with_weight_output(model: onnx.ModelProto, weight: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensor = next(t for t in out.graph.initializer if t.name == weight)
    out.graph.output.append(helper.make_tensor_value_info(weight, tensor.data_type, list(tensor.dims)))
    return out


def test_weight_that_is_a_graph_output_keeps_its_shape():
    model = _with_weight_output(_chain(widths=(3, 8, 8, 8)), "w1")
    prepared = onnx_prune.prepare(model)
    group = next(g for g in prepared.analysis.groups if "conv1" in g.nodes("producer"))
    assert group.prunable == 0 and any("graph output" in r for r in group.reasons)
    consumer = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    assert consumer.prunable == 0  # w1's input axis is part of the output's shape too
    pruned, _ = onnx_prune.prune(model, ratio=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model)
    before, after = run(model, feeds), run(pruned, feeds)
    assert [a.shape for a in before] == [a.shape for a in after]
    assert np.array_equal(before[1], after[1])


# --- 4. weights that are also graph inputs (overridable initializers; keep_initializers_as_inputs exports)
# Decision: such a weight may be replaced at run time by a tensor of its declared shape, so its channels are
# frozen, with a reason naming it.  Before: they were pruned, and feeding the original weight shape failed.

def _initializers_as_inputs(model: onnx.ModelProto, names=None, symbolic=False) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if names is None or tensor.name in names:
            dims = [f"d{i}" for i in range(len(tensor.dims))] if symbolic else list(tensor.dims)
            out.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, dims))
    return out


@pytest.mark.parametrize("symbolic", [False, True])
def test_overridable_initializer_is_frozen(symbolic):
    model = _initializers_as_inputs(_chain(widths=(3, 8, 8, 8)), {"w1"}, symbolic)
    prepared = onnx_prune.prepare(model)
    for producer in ("conv0", "conv1"):  # w1's input axis and output axis
        group = next(g for g in prepared.analysis.groups if producer in g.nodes("producer"))
        assert group.prunable == 0 and any("graph input" in r for r in group.reasons), group.reasons
    pruned, _ = onnx_prune.prune(model, ratio=0.5)
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    feeds = [dict(f, w1=w1 * 0.5) for f in feeds_for(model)]  # the weight overridden at run time
    assert [a.shape for a in run(pruned, feeds)] == [a.shape for a in run(model, feeds)]  # accepts that shape
    assert next(t for t in pruned.graph.initializer if t.name == "w2").dims[0] < 8  # the rest is pruned


def test_keep_initializers_as_inputs_export_is_frozen_with_a_reason():
    model = _initializers_as_inputs(_chain(widths=(3, 8, 8, 8)))  # every weight is an input (IR < 4 style)
    with pytest.raises(PruneError, match="graph input"):
        onnx_prune.prune(model, ratio=0.5)


# --- 13. real exports: a group emptied through a carrier (BlazeFace), -1 dims (PaddlePaddle)
# Before: in `blazeface_block` the stem's 4 channels share a group with 20 frozen padding channels, so keeping
# 20 of 24 at ratio 0.2 kept just the padding and wrote conv0 as [0, 3, 3, 3] (and the depthwise conv on it as
# [0, 1, 3, 3]); `paddle_se` (dims declared -1) died with "all elements of broadcast shape must be non-negative".

@pytest.mark.parametrize("ratio", [0.2, 0.9])
def test_no_tensor_is_emptied_through_a_carrier(ratio):
    path = fixture_path("blazeface_block")
    model, _ = onnx_prune.prune(path, ratio=ratio)
    assert io.zero_sized_dims(model) == []
    io.check_result(model)
    conv0 = next(t for t in model.graph.initializer if t.name == "conv0.weight")
    assert 1 <= conv0.dims[0] < 4 or ratio < 0.5
    original = onnx_prune.prepare(path).model
    feeds = feeds_for(original)
    assert [a.shape for a in run(model, feeds)] == [a.shape for a in run(original, feeds)]


def test_paddle_style_export_with_negative_dims():
    path = fixture_path("paddle_se")
    prepared = onnx_prune.prepare(path)
    features = next(g for g in prepared.analysis.groups if "conv0" in g.nodes("producer"))
    assert "conv2" in features.nodes("producer") and features.prunable == features.size  # SE gate tied
    model, _ = onnx_prune.prune(path, ratio=0.3)
    onnx.checker.check_model(model, full_check=True)
    io.check_result(model)
    feeds = feeds_for(prepared.model)  # dynamic H/W: any size runs
    assert [a.shape for a in run(model, feeds)] == [a.shape for a in run(prepared.model, feeds)]


# --- 7. the model was executed while pruning (cost counting ran onnxruntime when a conv shape was not static)
# Before: a custom-domain op (onnxruntime cannot load it) made analyze and prune fail, and a huge
# ConstantOfShape branch was built in memory.  Now shapes come from static inference and folding only.

def _custom_op_model() -> onnx.ModelProto:
    model = _chain(widths=(3, 8, 8, 8))
    graph = model.graph
    relu0 = next(n for n in graph.node if n.name == "relu0")
    relu0.output[0] = "r0_in"
    graph.node.insert(list(graph.node).index(relu0) + 1,
                      helper.make_node("Mystery", ["r0_in"], ["r0"], name="mystery", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_custom_domain_op_freezes_channels_without_running_the_model():
    model = _custom_op_model()
    report = onnx_prune.analyze(model)
    frozen = next(g for g in report.groups if g.name == "conv0")
    assert frozen.frozen == frozen.size and "custom op" in frozen.reasons[0]
    # default options: the statistics bnvar would measure cannot be (onnxruntime cannot load the op), so the
    # criterion falls back and nothing is compensated, instead of failing
    pruned, _ = onnx_prune.prune(model, ratio=0.5)
    w2 = next(t for t in pruned.graph.initializer if t.name == "w2")
    assert w2.dims[0] < 8  # the layers after it are still pruned
    cost = count_cost(model, partial=True)
    assert set(cost.unknown) == {"conv1", "conv2", "fc"} and cost.per_node["conv0"].macs == 8 * 8 * 8 * 27
    assert any("MACs unknown for node 'conv1'" in line for line in cost.unknown_lines())


def _huge_branch_model() -> onnx.ModelProto:
    """conv1's input is reshaped by a target computed from a 4e15-element ConstantOfShape (it adds 0)."""
    model = _chain(widths=(3, 8, 8))
    graph = model.graph
    nodes = [
        helper.make_node("ConstantOfShape", ["huge.shape"], ["huge"], name="huge",
                         value=numpy_helper.from_array(np.zeros(1, np.int64))),
        helper.make_node("ReduceMax", ["huge"], ["zero"], name="zero", keepdims=0),
        helper.make_node("Add", ["target", "zero"], ["target2"], name="target2"),
        helper.make_node("Reshape", ["r0", "target2"], ["r0r"], name="reshape"),
    ]
    graph.initializer.extend([numpy_helper.from_array(np.array([10**6, 10**6, 4000], np.int64), "huge.shape"),
                              numpy_helper.from_array(np.array([0, 8, 8, 8], np.int64), "target")])
    conv1 = next(n for n in graph.node if n.name == "conv1")
    conv1.input[0] = "r0r"
    index = list(graph.node).index(conv1)
    for node in reversed(nodes):
        graph.node.insert(index, node)
    return model


def test_huge_constant_of_shape_is_never_built():
    model = _huge_branch_model()
    onnx.checker.check_model(model, full_check=True)
    report = onnx_prune.analyze(model)
    assert report.groups
    pruned, _ = onnx_prune.prune(model, ratio=0.5)  # statistics unmeasurable: no crash (see the custom-op test)
    onnx.checker.check_model(pruned, full_check=True)
    cost = count_cost(model, partial=True)
    assert "conv1" in cost.unknown and cost.per_node["conv0"].macs == 8 * 8 * 8 * 27


def test_measuring_shapes_is_opt_in_and_bounded():
    model = _huge_branch_model()
    cost = count_cost(model, partial=True, measure=True)  # the child process hits its memory cap: still unknown
    assert "conv1" in cost.unknown
    custom = count_cost(_custom_op_model(), partial=True, measure=True)  # onnxruntime cannot load it
    assert "conv1" in custom.unknown


# --- 10. user errors reported as "internal error": external data that points outside the model's folder or
# holds fewer bytes than a tensor needs.  Before: onnx's ValidationError escaped load() (exit 3).

def _pointing_at(tmp_path, folder: str, location: str, data: bytes):
    model = _chain()
    _save_external(model, tmp_path / "full.onnx", "full.onnx.data")
    proto = onnx.load(str(tmp_path / "full.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / "short.data").write_bytes(data)
    onnx.save(proto, str(tmp_path / folder / "m.onnx"))
    return tmp_path / folder / "m.onnx"


@pytest.mark.parametrize("location, words", [("../full.onnx.data", "outside"), ("short.data", "exceeds")])
def test_bad_external_data_is_a_user_error(tmp_path, location, words):
    path = _pointing_at(tmp_path, "sub", location, b"\0" * 100)
    with pytest.raises(PruneError, match=f"cannot read its external data.*{words}"):
        onnx_prune.prepare(path)
    with pytest.raises(PruneError):
        onnx_prune.analyze(path)


def test_reports_are_written_atomically_and_never_over_the_input(tmp_path):
    onnx.save(_chain(), str(tmp_path / "in.onnx"))
    before = (tmp_path / "in.onnx").read_bytes()
    with pytest.raises(OutputPathError, match="input model"):
        io.write_text(tmp_path / "in.onnx", "{}", input_path=tmp_path / "in.onnx", label="--report")
    assert (tmp_path / "in.onnx").read_bytes() == before
    io.write_text(tmp_path / "r.json", '{"a": 1}\n', input_path=tmp_path / "in.onnx")
    assert (tmp_path / "r.json").read_text() == '{"a": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "r.json"]


# --- 12. which opsets work: every opset from 11 to the newest the installed onnx knows (README says so)

@pytest.mark.parametrize("opset", range(11, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_from_11_prunes_and_loads(opset):
    model = _chain(widths=(3, 8, 8), opset=opset)
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    pruned, _ = onnx_prune.prune(model, ratio=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    io.check_result(pruned)  # onnxruntime loads it at its default optimisation level
    assert next(t for t in pruned.graph.initializer if t.name == "w0").dims[0] == 4
