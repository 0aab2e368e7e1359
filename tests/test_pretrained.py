"""The by-photo data split of the pretrained-model benchmark, and the pretrained models' two export kinds.

The split tests use only committed files (numpy + Pillow).  The model tests export MobileNetV2 and
EfficientNet-Lite0 on first use into the git-ignored ``models/zoo`` (dev extra: torch, torchvision), as
``tests/test_trained_models.py`` does for the ImageNet MobileNetV2.
"""
import importlib.util
import sys

import numpy as np
import onnx
import pytest

from conftest import ROOT

PRETRAINED = ROOT / "models" / "pretrained"
sys.path[:0] = [str(PRETRAINED), str(ROOT / "benchmarks")]
import photo_split  # noqa: E402 - numpy (+ Pillow)

import pretrained_models  # noqa: E402 - no torch

RECORDS = pretrained_models.records()
MODELS = sorted(RECORDS)


def test_sides_partition_the_photos():
    names = [p["name"] for p in photo_split.manifest()]
    assert len(names) == len(set(names))
    evaluation, calibration = set(photo_split.side_photos("eval")), set(photo_split.side_photos("calib"))
    assert not evaluation & calibration
    assert evaluation | calibration == set(names)
    assert len(calibration) >= 20 and len(evaluation) >= 20


def test_every_photo_is_stored_with_its_provenance():
    for record in photo_split.manifest():
        assert record["licence"] and record["source"] and record["author"], record["name"]
        image = photo_split.photo(record["name"])
        assert image.dtype == np.uint8 and image.shape == (*record["size"], 3)
        assert min(image.shape[:2]) == 256


def test_crops_of_a_side_come_only_from_its_photos():
    for side in photo_split.SIDES:
        mine = set(photo_split.side_photos(side))
        plan = photo_split.crop_plan(side, photo_split.BOXES_PER_PHOTO * len(mine))
        assert {name for name, _ in plan} == mine
    keys = photo_split._boxes().keys()
    assert {key.split("/")[1] for key in keys if key.startswith("calib/")} == set(photo_split.side_photos("calib"))
    assert {key.split("/")[1] for key in keys if key.startswith("eval/")} == set(photo_split.side_photos("eval"))


def test_every_stored_box_lies_inside_its_photo():
    for key, boxes in photo_split._boxes().items():
        height, width = photo_split.photo(key.split("/")[1]).shape[:2]
        top, left, h, w, flip = boxes.T.astype(np.int64)
        assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all(), key
        assert (top + h <= height).all() and (left + w <= width).all(), key
        assert set(np.unique(flip)) <= {0, 1}


def test_crops_are_deterministic_and_cut_from_their_boxes():
    first, source = photo_split.crops("calib", 6)
    again, _ = photo_split.crops("calib", 6)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (6, 224, 224, 3) and first.dtype == np.uint8
    names = photo_split.side_photos("calib")
    for crop, index, (name, (top, left, h, w, flip)) in zip(first, source, photo_split.crop_plan("calib", 6)):
        assert names[index] == name
        expected = photo_split.resize_bilinear(photo_split.photo(name)[top: top + h, left: left + w], 224)
        np.testing.assert_array_equal(crop, expected[:, ::-1] if flip else expected)


def test_fewer_photos_give_the_same_count_from_fewer_sources():
    _, source = photo_split.crops("calib", 12, photos=5)
    assert len(source) == 12 and sorted(set(source.tolist())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        photo_split.crop_plan("calib", photo_split.BOXES_PER_PHOTO * 2 + 1, photos=2)
    with pytest.raises(ValueError):
        photo_split.crop_plan("calib", 4, photos=len(photo_split.side_photos("calib")) + 1)


def test_labelled_images_are_evaluation_photos():
    images, labels = photo_split.labelled_images()
    assert images.shape == (len(labels), 224, 224, 3) and len(labels) >= 10
    assert ((labels >= 0) & (labels < 1000)).all()
    evaluation = [p for p in photo_split.manifest() if p["side"] == "eval" and p["label"] >= 0]
    assert labels.tolist() == [p["label"] for p in evaluation]
    for image, record in zip(images, evaluation):
        np.testing.assert_array_equal(image, photo_split.centre_crop(photo_split.photo(record["name"])))
    calibration = [p for p in photo_split.manifest() if p["side"] == "calib" and p["label"] >= 0]
    assert calibration, "ImageNet photos calibrate too (their labels are never used there)"


def test_normalize_matches_the_formula():
    pixels = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    x = photo_split.normalize(pixels, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    np.testing.assert_allclose(x[0, :, 0, 0], [(0 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.25, 0.5], rtol=1e-6, atol=1e-6)


def test_benchmark_calibration_rows_and_metric():
    import pretrained_quality as pq
    from onnx_prune.pipeline import SweepConfig

    free, needs = SweepConfig("a", {}), SweepConfig("b", {}, True)
    assert pq.calibration_variants(free, [64, 256], [5, None], False) == [(0, None)]
    assert pq.calibration_variants(needs, [64, 256, 1024], [5, None], False) == [(64, None), (256, None),
                                                                                (1024, None), (256, 5)]
    assert pq.calibration_variants(free, [64], [None], True) == [(0, None), (64, None)]
    reference = np.eye(4, dtype=np.float32)
    logits = reference[[0, 1, 3, 3]]
    assert pq.measure(reference, logits, np.array([0, -1, 2, 3])) == {"top1_agreement": 0.75, "accuracy": 0.6667}
    assert pq.selected("l2/domino-o", None, ["*/first"]) and not pq.selected("l2/first", None, ["*/first"])


def build(name: str, kind: str):
    """The export, built on first use; a clear failure when torch is missing."""
    path = pretrained_models.model_path(name, kind)
    if path.exists():
        return path
    if importlib.util.find_spec("torch") is None:
        pytest.fail(f"{path} is missing and torch is not installed to build it: `pip install -e '.[dev]'`")
    import build_pretrained  # noqa: E402 - imports torch

    return build_pretrained.build(name, kind)


@pytest.mark.parametrize("name", MODELS)
def test_export_kinds_differ_only_in_batchnorm_and_agree(name):
    paths = pretrained_models
    fused, kept = build(name, "fused"), build(name, "bn")
    ops = {kind: [n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node]
           for kind, p in (("fused", fused), ("bn", kept))}
    assert "BatchNormalization" not in ops["fused"]
    assert ops["bn"].count("BatchNormalization") == ops["bn"].count("Conv") == ops["fused"].count("Conv")
    x, labels = paths.labelled_inputs(name)
    a, b = paths.logits(fused, x), paths.logits(kept, x)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    for kind, scores in (("fused", a), ("bn", b)):
        record = RECORDS[name]["kinds"][kind]
        assert scores.argmax(1).tolist() == record["labelled_predictions"]
        assert int((scores.argmax(1) == labels).sum()) == record["labelled_top1"]["correct"]


def test_benchmark_forked_run_gives_the_in_process_model():
    import pretrained_quality as pq
    from onnx_prune.pipeline import prepare

    prepared = prepare(str(ROOT / "models" / "fixtures" / "residual_add.onnx"))
    inline, row = pq.run_one(prepared, 0.7, {"criterion": "l2"}, timeout=None)
    forked, forked_row = pq.run_one(prepared, 0.7, {"criterion": "l2"}, timeout=120)
    assert inline.SerializeToString() == forked.SerializeToString()
    assert row["keep_macs"] == forked_row["keep_macs"] <= 0.71
    refused, error = pq.run_one(prepared, 0.7, {"criterion": "no-such-criterion"}, timeout=120)
    assert refused is None and "no-such-criterion" in error["error"]
