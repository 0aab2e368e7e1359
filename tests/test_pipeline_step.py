"""onnx-prune as a deployment-pipeline step: user data in (arrays, image folders, data loaders, labels), task
metrics and gates out, exit statuses a CI can act on, and nothing written unless everything passed.

Most tests run the command as a user does (a subprocess of the installed entry point) and check the API too.
"""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_prune
from onnx_prune.runtime.data import DataError, load_data, load_feeds
from onnx_prune.runtime.fidelity import check_gates

from conftest import ROOT, fixture_path

RESNET20 = ROOT / "models" / "trained" / "resnet20.onnx"
FMNIST = ROOT / "models" / "trained" / "fmnist_eval.npz"
MEAN, STD = "0.2860", "0.3530"  # models/trained/fashion_mnist.py: the training normalisation
ACCURACY = json.loads((ROOT / "models" / "trained" / "accuracy.json").read_text())


def cli(*args, cwd=None, timeout=600):
    """Run `onnx-prune ARGS` through the installed entry point; (status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "onnx_prune.entry", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line or "gate failed" in line]


def nothing_written(folder: Path, *names: str) -> bool:
    return not any((folder / n).exists() for n in names) and not list(folder.glob(".onnx-prune-*"))


@pytest.fixture(scope="module")
def fmnist_small(tmp_path_factory) -> Path:
    """The first 300 committed evaluation images with their labels, as a user would hold them (uint8)."""
    with np.load(FMNIST) as data:
        images, labels = data["images"][:300], data["labels"][:300]
    path = tmp_path_factory.mktemp("fmnist") / "fmnist300.npz"
    np.savez(path, images=images, labels=labels)
    return path


# --- data in -----------------------------------------------------------------------------------------


def test_an_nchw_npz_is_n_samples_for_calibration_and_validation(tmp_path):
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=data)
    feeds = load_feeds(tmp_path / "calib.npz", fixture_path("residual_add"))
    assert len(feeds) == 16 and all(f["x"].shape == (1, 3, 8, 8) for f in feeds)
    assert np.array_equal(np.concatenate([f["x"] for f in feeds]), data)
    report = tmp_path / "r.json"
    code, out, err = cli(fixture_path("residual_add"), tmp_path / "o.onnx", "--target-macs", "0.6", "--repair",
                         "--calib", tmp_path / "calib.npz", "--inputs", tmp_path / "calib.npz", "--report", report)
    assert code == 0, err
    saved = json.loads(report.read_text())
    assert saved["validation"]["samples"] == 16 and not saved["validation"]["synthetic"]
    assert saved["details"]["repair"]["layers"]  # repair ran: it needs at least 2 feeds
    assert "16 samples from calib.npz" in out


def test_a_fixed_batch_model_takes_samples_in_chunks_of_its_batch(tmp_path):
    model = onnx.load(str(fixture_path("se")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch fixed to 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    data = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    feeds = load_feeds({"x": data}, model)
    assert [f["x"].shape for f in feeds] == [(2, 3, 8, 8)] * 3
    with pytest.raises(DataError, match="holds 5 samples, not a multiple of the model's batch 2"):
        load_feeds({"x": data[:5]}, model)


def _write_pngs(folder: Path, count: int = 5) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8) for i in range(count)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return images


def test_image_folder_with_explicit_preprocessing(tmp_path):
    from PIL import Image

    images = _write_pngs(tmp_path / "images")
    feeds = load_feeds(tmp_path / "images", fixture_path("se"), image_size="8,8", mean="0.5,0.4,0.3", std="0.25",
                       color="BGR")
    assert len(feeds) == 5 and feeds[0]["x"].shape == (1, 3, 8, 8) and feeds[0]["x"].dtype == np.float32
    resized = np.asarray(Image.fromarray(images[3]).resize((8, 8), Image.BILINEAR), np.float32) / 255
    expected = ((resized[:, :, ::-1] - np.array([0.5, 0.4, 0.3], np.float32)) / 0.25).transpose(2, 0, 1)
    assert np.allclose(feeds[3]["x"][0], expected, atol=1e-6)
    # NHWC: the same pixels, channels last
    nhwc = load_feeds(tmp_path / "images", _nhwc_model(), mean="0.5,0.4,0.3", std="0.25", color="BGR",
                      layout="NHWC")
    assert np.allclose(nhwc[3]["x_nhwc"][0], expected.transpose(1, 2, 0), atol=1e-6)
    code, out, err = cli(fixture_path("se"), tmp_path / "o.onnx", "--inputs", tmp_path / "images",
                         "--image-size", "8,8", "--mean", "0.5", "--std", "0.25")
    assert code == 0, err
    assert "5 images from" in out and "resized to 8x8, RGB, NCHW" in err


def _nhwc_model() -> onnx.ModelProto:
    """x [N, 8, 8, 3] -> Transpose -> the se fixture's graph."""
    from onnx import helper

    model = onnx.load(str(fixture_path("se")))
    graph = model.graph
    graph.input[0].name = "x_nhwc"
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims[1:], (8, 8, 3)):
        dim.dim_value = value
    graph.node.insert(0, helper.make_node("Transpose", ["x_nhwc"], ["x"], perm=[0, 3, 1, 2], name="to_nchw"))
    return model


def test_gray_images_for_a_one_channel_model_and_a_dynamic_size_needs_image_size(tmp_path):
    _write_pngs(tmp_path / "images", 3)
    feeds = load_feeds(tmp_path / "images", RESNET20, mean=MEAN, std=STD)
    assert [f["input"].shape for f in feeds] == [(1, 1, 28, 28)] * 3
    model = onnx.load(str(fixture_path("se")))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    with pytest.raises(DataError, match="give image_size= H,W"):  # named as the API caller spells it
        load_feeds(tmp_path / "images", model)
    onnx.save(model, str(tmp_path / "dynamic.onnx"))
    code, _, err = cli(tmp_path / "dynamic.onnx", tmp_path / "o.onnx", "--inputs", tmp_path / "images")
    assert code == 1 and "give --image-size H,W" in err  # and as the command line spells it


def test_data_loader_script_with_labels(tmp_path):
    loader = tmp_path / "my_loader.py"
    loader.write_text(
        "import numpy as np\n"
        f"DATA = np.load({str(FMNIST)!r})\n"
        "def load_data():\n"
        "    for start in range(0, 100, 25):\n"
        "        x = DATA['images'][start:start + 25].astype(np.float32) / 255\n"
        f"        yield {{'input': ((x - {MEAN}) / {STD})[:, None], 'label': DATA['labels'][start:start + 25]}}\n")
    data = load_data(loader, RESNET20)
    assert len(data.feeds) == 4 and data.samples == 100 and len(data.labels) == 100
    code, out, err = cli(RESNET20, tmp_path / "o.onnx", "--ratio", "0.1", "--data-loader", loader)
    assert code == 0, err
    assert re.search(r"accuracy \(logits, 100 labelled samples\): \d+\.\d\d% -> \d+\.\d\d%", out)
    broken = tmp_path / "broken.py"
    broken.write_text("def load_data():\n    raise RuntimeError('disk on fire')\n    yield\n")
    code, _, err = cli(RESNET20, tmp_path / "p.onnx", "--data-loader", broken)
    assert code == 1 and "load_data() raised RuntimeError: disk on fire" in err and "Traceback" not in err
    assert nothing_written(tmp_path, "p.onnx")


def test_labels_give_accuracy_before_and_after(tmp_path):
    # the committed subset's accuracy, reproduced exactly from the user's uint8 images and their labels
    validation = onnx_prune.validate(RESNET20, RESNET20, FMNIST, mean=MEAN, std=STD)
    assert validation.samples == 2000 and not validation.synthetic
    assert validation.accuracy_before == validation.accuracy_after == ACCURACY["resnet20"]["eval_subset"]["accuracy"]
    assert validation.agreement == 1.0 and validation.relative_error == 0.0
    # labels from a text file, for an .npz without them
    with np.load(FMNIST) as data:
        images, labels = data["images"][:200], data["labels"][:200]
    np.savez(tmp_path / "x.npz", input=images)
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)))
    code, out, err = cli(RESNET20, tmp_path / "o.onnx", "--ratio", "0.2", "--inputs", tmp_path / "x.npz",
                         "--labels", tmp_path / "labels.txt", "--mean", MEAN, "--std", STD, "--json")
    assert code == 0, err
    summary = json.loads(out)
    session = onnx_prune.validate(RESNET20, tmp_path / "o.onnx", tmp_path / "x.npz", labels=labels, mean=MEAN,
                                  std=STD)
    assert summary["validation"]["accuracy_before"] == session.accuracy_before
    assert summary["validation"]["accuracy_after"] == session.accuracy_after
    assert summary["validation"]["samples"] == 200
    code, _, err = cli(RESNET20, tmp_path / "p.onnx", "--inputs", tmp_path / "x.npz", "--labels",
                       tmp_path / "labels.txt", "--ratio", "0.2")
    assert code == 0  # without --mean/--std it still runs (the numbers are then on unnormalised pixels)
    (tmp_path / "short.txt").write_text("1 2 3")
    code, _, err = cli(RESNET20, tmp_path / "q.onnx", "--inputs", tmp_path / "x.npz", "--labels",
                       tmp_path / "short.txt")
    assert code == 1 and "3 labels for 200 samples" in err and nothing_written(tmp_path, "q.onnx")


def test_generated_inputs_are_called_synthetic_every_time(tmp_path):
    code, out, err = cli(fixture_path("se"), tmp_path / "o.onnx")
    assert code == 0, err
    assert "generated random inputs" in err and "say little about accuracy" in err
    validation = onnx_prune.validate(fixture_path("se"), tmp_path / "o.onnx")
    assert validation.synthetic and any("not real data" in note for note in validation.notes)


# --- gates --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, metric", [(["--min-agreement", "0.999"], "top-1 agreement"),
                                          (["--max-rel-error", "1e-6"], "relative error"),
                                          (["--min-accuracy", "0.95"], "accuracy")])
def test_a_failed_gate_exits_4_and_writes_nothing(tmp_path, fmnist_small, gate, metric):
    common = [RESNET20, tmp_path / "o.onnx", "--ratio", "0.4", "--inputs", fmnist_small, "--mean", MEAN,
              "--std", STD, "--report", tmp_path / "r.json", *gate]
    code, out, err = cli(*common)
    assert code == 4, err
    failed = error_lines(err)
    assert len(failed) == 1 and metric in failed[0] and gate[0] in failed[0] and "nothing written" in failed[0]
    assert nothing_written(tmp_path, "o.onnx", "r.json", "o.onnx.data")
    assert "accuracy" in out  # the measurements are still shown
    code, _, err = cli(*common, "--keep-failed")
    assert code == 4 and (tmp_path / "o.onnx").exists() and (tmp_path / "r.json").exists()
    assert json.loads((tmp_path / "r.json").read_text())["gates"]["passed"] is False


def test_min_speedup_is_a_gate(tmp_path):
    code, out, err = cli(fixture_path("residual_add"), tmp_path / "o.onnx", "--ratio", "0.5", "--min-speedup", "1000",
                         "--json")
    assert code == 4 and "speed-up" in err and "--min-speedup 1000" in err and "nothing written" in err
    summary = json.loads(out)
    assert summary["speed"]["speedup"] < 1000 and summary["speed"]["runs"] > 0 and not summary["written"]
    assert nothing_written(tmp_path, "o.onnx")


def test_passing_gates_exit_0(tmp_path, fmnist_small):
    code, out, err = cli(RESNET20, tmp_path / "o.onnx", "--ratio", "0", "--inputs", fmnist_small, "--mean", MEAN,
                         "--std", STD, "--min-agreement", "1", "--max-rel-error", "1e-5", "--min-accuracy", "0.8")
    assert code == 0, err
    assert (tmp_path / "o.onnx").exists()


def test_check_gates_api():
    validation = onnx_prune.validate(RESNET20, RESNET20, FMNIST, mean=MEAN, std=STD)
    assert check_gates(validation, min_agreement=1.0, max_rel_error=0.0, min_accuracy=0.9) == []
    failures = check_gates(validation, min_accuracy=0.95)
    assert [f.metric for f in failures] == ["accuracy"]
    assert failures[0].message() == "accuracy 0.904 is below min_accuracy 0.95"  # named as the API caller spelled it


@pytest.mark.parametrize("make, words", [
    (lambda d: np.savez(d / "in.npz", a=np.zeros((2, 1, 28, 28)), b=np.zeros((2, 1, 28, 28))), "missing arrays"),
    (lambda d: np.savez(d / "in.npz", input=np.zeros((2, 1, 32, 32), np.float32)), "dim 2 is 32, the model fixes "
                                                                                    "it to 28"),
    (lambda d: np.savez(d / "in.npz", input=np.full((2, 1, 28, 28), np.nan, np.float32)), "contains NaN"),
    (lambda d: np.savez(d / "in.npz", input=np.full((2, 1, 28, 28), np.inf, np.float32)), "contains Inf"),
    (lambda d: (d / "in.npz").write_bytes(b"not an archive"), "not a readable .npz"),
    (lambda d: None, "no such file"),
])
def test_bad_inputs_exit_1_before_pruning(tmp_path, make, words):
    make(tmp_path)
    code, out, err = cli(RESNET20, tmp_path / "o.onnx", "--inputs", tmp_path / "in.npz", "--report",
                         tmp_path / "r.json")
    assert code == 1 and words in err and "--inputs" in err and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "validating" not in err  # refused before any pruning
    assert nothing_written(tmp_path, "o.onnx", "r.json")


def test_nan_calibration_data_is_refused(tmp_path):
    data = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    data[3, 1, 2, 2] = np.nan
    np.savez(tmp_path / "calib.npz", x=data)
    code, _, err = cli(fixture_path("residual_add"), tmp_path / "o.onnx", "--criterion", "activation", "--calib",
                       tmp_path / "calib.npz")
    assert code == 1 and "contains NaN (1 of" in err and nothing_written(tmp_path, "o.onnx")


# --- output paths, order, signals -------------------------------------------------------------------------


def test_report_paths_that_would_overwrite_the_input_or_output_are_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(fixture_path("se").read_bytes())
    before = model.read_bytes()
    for flag, report in [("--report", model), ("--report", tmp_path / "o.onnx"), ("--blend-report", model),
                         ("--blend-report", tmp_path / "o.onnx")]:
        code, _, err = cli(model, tmp_path / "o.onnx", flag, report)
        assert code == 1 and "Traceback" not in err and len(error_lines(err)) == 1, err
        assert model.read_bytes() == before and not (tmp_path / "o.onnx").exists()
    code, _, err = cli(model, tmp_path / "o.onnx", "--report", tmp_path / "missing" / "r.json")
    assert code == 1 and "does not exist" in err and "analysing" not in err  # refused before any work
    assert not (tmp_path / "o.onnx").exists()


def test_report_may_not_be_the_inputs_external_data(tmp_path):
    import shutil

    for name in ("external_data.onnx", "external_data.onnx.data"):
        shutil.copy(fixture_path("external_data").parent / name, tmp_path / name)
    data = tmp_path / "external_data.onnx.data"
    before = data.read_bytes()
    code, _, err = cli(tmp_path / "external_data.onnx", tmp_path / "o.onnx", "--report", data)
    assert code == 1 and data.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_sigterm_while_working_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "o.onnx"
    process = subprocess.Popen([sys.executable, "-m", "onnx_prune.entry", str(RESNET20), str(out), "--criterion",
                                "blend", "--generations", "200", "--population", "20", "--target-macs", "0.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = ""
    while "generation" not in seen and time.time() < deadline:  # wait until the search runs
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, seen + err
    assert "interrupted" in err and "Traceback" not in err
    assert nothing_written(tmp_path, "o.onnx")


def _catches(pid: int, signum: int) -> bool:
    """Has process `pid` installed a handler for `signum`? (Linux: the SigCgt mask in /proc/PID/status)"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def test_sigint_during_imports_is_one_line():
    process = subprocess.Popen([sys.executable, "-m", "onnx_prune.entry", str(RESNET20), "x.onnx"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until the entry point catches SIGTERM (its first act), then interrupt the package imports that follow
    deadline = time.time() + 60
    while not _catches(process.pid, signal.SIGTERM) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err and err.strip() == \
        "onnx-prune: interrupted; nothing was written"


# --- command-line conventions --------------------------------------------------------------------------


def test_version_and_help():
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"onnx-prune {onnx_prune.__version__}"
    code, out, _ = cli("--help")
    assert code == 0 and out.count("  onnx-prune ") >= 3 and "exit status" in out


@pytest.mark.parametrize("args, hint", [
    (["--ration", "0.3"], "did you mean --ratio?"),
    (["--method", "Red"], "did you mean red?"),
    (["--criterion", "fgpm"], "did you mean fpgm?"),
    (["--allocation", "Global"], "did you mean global?"),
])
def test_typos_get_one_line_with_a_suggestion(tmp_path, args, hint):
    code, out, err = cli(fixture_path("se"), tmp_path / "o.onnx", *args)
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "o.onnx").exists()


def test_a_typo_in_a_subcommand_is_a_usage_error():
    code, _, err = cli("analyse", fixture_path("se"))
    assert code == 2 and "did you mean analyze?" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [(["--seed", "-1"], "--seed must be a non-negative"),
                                         (["--ratio", "nan"], "--ratio must be a finite number"),
                                         (["--min-agreement", "1.5"], "in [0, 1]"),
                                         (["--min-agreement", "0.9", "--no-validate"], "drop --no-validate"),
                                         (["--shape", "x=1,a"], "--shape x=1,a")])
def test_unusable_values_are_usage_errors(tmp_path, args, words):
    code, _, err = cli(fixture_path("se"), tmp_path / "o.onnx", *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_stdout_stderr_quiet_and_json(tmp_path):
    code, out, err = cli(fixture_path("residual_add"), tmp_path / "a.onnx", "--target-macs", "0.7")
    assert code == 0
    assert "requested" in out and "achieved" in out and "max abs err" in out  # results
    assert "analysing" in err and "wrote" in err and "max abs err" not in err  # progress and notices
    code, out, err = cli(fixture_path("residual_add"), tmp_path / "b.onnx", "--criterion", "blend", "--generations",
                         "2", "--population", "5", "--target-macs", "0.7", "--quiet")
    assert code == 0 and out == "" and err == ""  # blend progress included
    code, out, err = cli(fixture_path("residual_add"), tmp_path / "c.onnx", "--target-macs", "0.7", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["written"] and summary["exit_status"] == 0
    assert summary["target"]["kind"] == "macs" and abs(summary["target"]["macs_kept"] - 0.7) < 0.1
    assert summary["macs_after"] < summary["macs_before"] and summary["validation"]["synthetic"] is True


def test_errors_are_classified_and_internal_ones_say_how_to_report(tmp_path):
    from onnx_prune.cli import classify

    status, line = classify(KeyError("conv0"))
    assert status == 3 and "internal error" in line and "report" in line and "\n" not in line
    assert classify(onnx_prune.PruneError("bad input"))[0] == 1
    assert classify(PermissionError(13, "Permission denied", "/x/out.onnx")) == \
        (1, "onnx-prune: error: Permission denied: /x/out.onnx")
    # with --json a failure is a document on stdout too
    code, out, err = cli(tmp_path / "missing.onnx", tmp_path / "o.onnx", "--json")
    assert code == 1 and json.loads(out) == {"written": False, "exit_status": 1, "error": err.strip().splitlines()[-1]}


# --- what changed, per layer --------------------------------------------------------------------------------


def _output_channels(model_path: Path) -> dict[str, int]:
    """Node name -> channels (dim 1) of its first output, by onnx shape inference on the written model."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    dims = {v.name: v.type.tensor_type.shape.dim for v in list(model.graph.value_info) + list(model.graph.output)}
    return {n.name: dims[n.output[0]][1].dim_value for n in model.graph.node if n.output[0] in dims}


def test_show_groups_and_analyze_against(tmp_path):
    out = tmp_path / "o.onnx"
    code, printed, err = cli(fixture_path("residual_add"), out, "--ratio", "0.5", "--show-groups")
    assert code == 0, err
    code, table, err = cli("analyze", out, "--against", fixture_path("residual_add"))
    assert code == 0, err
    rows = _output_channels(out)
    for match in re.finditer(r"^\d+\s+(\S+)(?: \(\+\d+\))?\s+(\d+) -> (\d+)", table, re.M):
        producer, before, after = match.group(1), int(match.group(2)), int(match.group(3))
        assert rows[producer] == after and after <= before
    assert table.count(" -> ") >= 2 and "MAC share" in table and "MAC share" in printed
    code, listing, _ = cli("analyze", out, "--against", fixture_path("residual_add"), "--json")
    groups = json.loads(listing)["groups"]
    assert sum(g["channels_after"] for g in groups) < sum(g["channels_before"] for g in groups)


def test_report_summary_and_plot(tmp_path, fmnist_small):
    reports = []
    for ratio in ("0.1", "0.3"):
        report = tmp_path / f"r{ratio}.json"
        code, _, err = cli(RESNET20, tmp_path / f"o{ratio}.onnx", "--ratio", ratio, "--inputs", fmnist_small,
                           "--mean", MEAN, "--std", STD, "--report", report)
        assert code == 0, err
        reports.append(report)
    code, out, err = cli("report", *reports, "--plot", tmp_path / "plot.png")
    assert code == 0, err
    assert out.count("accuracy") >= 2 and "MACs" in out
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli("report", reports[0], "--plot", reports[0])
    assert code == 1 and json.loads(reports[0].read_text())["macs_before"] > 0


def test_summary_is_one_screen():
    from onnx_prune.report import human, summary

    model, report = onnx_prune.prune(RESNET20, ratio=0.2)
    validation = onnx_prune.validate(RESNET20, model, FMNIST, mean=MEAN, std=STD)
    text = summary(report, validation)
    assert len(text.splitlines()) <= 12 and len(text) < 1200
    assert "accuracy 90.40% ->" in text and "MACs 8.66 M ->" in text
    assert human(272474) == "272 K" and human(8_660_000) == "8.66 M" and human(4.1e9) == "4.10 G"


def test_readme_setup_command_1_prints_a_real_accuracy(tmp_path):
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in setup.splitlines() if line.startswith("python3 -m pip install -e . &&"))
    prune = command.split("&&", 1)[1].strip()
    assert prune.startswith("onnx-prune models/trained/resnet20.onnx ")
    args = [a if not a.startswith("models/") else str(ROOT / a) for a in prune.split()[1:]]
    code, out, err = cli(*args, cwd=tmp_path)
    assert code == 0, err
    expected = f"accuracy (logits, 2000 labelled samples): {ACCURACY['resnet20']['eval_subset']['accuracy']:.2%} -> "
    assert expected in out


def test_plan_over_the_input_is_refused_and_apply_has_gates(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(fixture_path("concat").read_bytes())
    before = model.read_bytes()
    code, _, err = cli("plan", model, model, "--ratio", "0.5")
    assert code == 1 and "refusing to overwrite" in err and model.read_bytes() == before
    code, _, err = cli("plan", model, tmp_path / "plan.json", "--ratio", "0.5", "--quiet")
    assert code == 0 and err == ""
    code, _, err = cli("apply", model, tmp_path / "plan.json", tmp_path / "o.onnx", "--max-rel-error", "0")
    assert code == 4 and "relative error" in err and nothing_written(tmp_path, "o.onnx")
    code, _, err = cli("apply", model, tmp_path / "plan.json", tmp_path / "o.onnx", "--max-rel-error", "10")
    assert code == 0 and (tmp_path / "o.onnx").exists()
