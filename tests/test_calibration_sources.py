"""Calibration samples know their source (the photo a crop was cut from): the loaders read it, ranges slice it,
and the held-out checks of recalibration and repair hold out whole sources, so crops of a fitted photo are
never what a fit is judged on."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_prune
from onnx_prune.errors import PruneError
from onnx_prune.passes.obs import split_by_source
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.recalibrate import RecalibratePass, channel_map
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.data import DataError, Feeds, load_data, load_feeds, split_summary

from conftest import fixture_path
from test_sensitivity import two_group_model

SE = fixture_path("se")  # x [N, 3, 8, 8] (dynamic batch) -> logits


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 1.0, (count, 3, 8, 8)).astype(np.float32)


def _run(model, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(onnx.load(str(model)).SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def test_an_npz_sources_array_gives_each_sample_its_id_and_is_no_model_input(tmp_path):
    x = _images(6)
    ids = np.array(["cat.jpg", "cat.jpg", "dog.jpg", "dog.jpg", "dog.jpg", "owl.jpg"])
    np.savez(tmp_path / "calib.npz", images=x, sources=ids)  # the image array's name is not the input's
    feeds = load_feeds(tmp_path / "calib.npz", SE)
    assert isinstance(feeds, list) and len(feeds) == 6 and feeds.sources.tolist() == ids.tolist()
    assert [sorted(f) for f in feeds] == [["x"]] * 6  # the ids are not fed to the model
    outputs = _run(SE, feeds)
    assert [o.shape[0] for o in outputs] == [1] * 6  # dynamic batch: one sample a feed
    np.testing.assert_allclose(np.concatenate(outputs), _run(SE, [{"x": x}])[0], rtol=1e-5, atol=1e-5)
    # integer ids, a [feeds, batch] stack of feeds with ids of the same shape: flattened in feed order
    np.savez(tmp_path / "stack.npz", x=x.reshape(3, 2, 3, 8, 8), sources=np.array([[7, 7], [7, 8], [9, 9]]))
    stacked = load_data(tmp_path / "stack.npz", SE)
    assert len(stacked.feeds) == 3 and stacked.feeds[0]["x"].shape == (2, 3, 8, 8)
    assert stacked.sources.tolist() == [7, 7, 7, 8, 9, 9]
    # without ids: None, and the feeds are what they were
    np.savez(tmp_path / "plain.npz", x=x)
    plain = load_feeds(tmp_path / "plain.npz", SE)
    assert plain.sources is None and all(np.array_equal(a["x"], b["x"]) for a, b in zip(plain, feeds))


def test_a_range_slices_the_sources_with_the_samples(tmp_path):
    x = _images(8)
    np.savez(tmp_path / "calib.npz", x=x, sources=np.arange(8) // 2)
    picked = load_feeds(f"{tmp_path / 'calib.npz'}[3:7]", SE)
    assert picked.sources.tolist() == [1, 2, 2, 3]
    assert np.array_equal(np.concatenate([f["x"] for f in picked]), x[3:7])
    np.savez(tmp_path / "stack.npz", x=x.reshape(4, 2, 3, 8, 8), sources=np.arange(8))
    assert load_feeds(f"{tmp_path / 'stack.npz'}[1:3]", SE).sources.tolist() == [2, 3, 4, 5]  # feeds of 2


def test_an_image_folder_gives_one_source_per_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "photos" / "beach").mkdir(parents=True)
    names = ["a.png", "beach/b.png", "beach/c.png", "d.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(tmp_path / "photos" / name)
    data = load_data(tmp_path / "photos", SE)
    assert len(data.feeds) == 4 and data.sources.tolist() == sorted(names)  # the file order is the sample order
    assert load_feeds(f"{tmp_path / 'photos'}[1:3]", SE).sources.tolist() == ["beach/b.png", "beach/c.png"]


def test_a_data_loader_gives_a_source_per_feed_or_per_sample(tmp_path):
    loader = tmp_path / "loader.py"
    loader.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    yield {'x': rng.normal(size=(2, 3, 8, 8)).astype(np.float32), 'source': 'first.jpg'}\n"
        "    yield {'x': rng.normal(size=(3, 3, 8, 8)).astype(np.float32), 'sources': ['a', 'b', 'b']}\n")
    data = load_data(loader, SE)
    assert data.samples == 5 and data.sources.tolist() == ["first.jpg", "first.jpg", "a", "b", "b"]
    partial = tmp_path / "partial.py"
    partial.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    yield {'x': np.zeros((1, 3, 8, 8), np.float32), 'source': 1}\n"
        "    yield {'x': np.zeros((1, 3, 8, 8), np.float32)}\n")
    with pytest.raises(DataError, match="1 of 2 feeds carry a source; give all or none"):
        load_data(partial, SE)


def test_mismatched_or_unusable_source_ids_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "short.npz", x=_images(6), sources=np.arange(5))
    with pytest.raises(DataError, match="5 source ids for 6 samples; give one per sample"):
        load_feeds(tmp_path / "short.npz", SE)
    np.savez(tmp_path / "float.npz", x=_images(6), sources=np.linspace(0, 1, 6))
    with pytest.raises(DataError, match="source ids must be integers or strings"):
        load_feeds(tmp_path / "float.npz", SE)
    model = two_group_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([_images(2, s).repeat(2, 2).repeat(2, 3) for s in range(4)]),
             sources=np.arange(7))
    with pytest.raises(PruneError) as caught:
        onnx_prune.prune(str(tmp_path / "m.onnx"), ratio=0.25, calib=str(tmp_path / "calib.npz"))
    message = str(caught.value)
    assert "7 source ids for 8 samples" in message and "calib.npz" in message and "\n" not in message


def _two_group_feeds(count: int, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0.5, 1.0, (2, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def _pruned_two_groups():
    prepared = prepare(two_group_model())
    a = next(g for g in prepared.analysis.groups if g.name == "convA")
    plan = Plan({a.id: GroupPlan(np.array([1, 3, 5, 7]))})
    pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
    return prepared, pruned, channel_map(prepared.model, prepared.analysis, plan)


def test_recalibration_holds_out_a_whole_source_and_says_so():
    prepared, pruned, mapping = _pruned_two_groups()
    feeds = _two_group_feeds(8)
    sources = np.repeat(["left.jpg", "right.jpg"], 8)  # feeds 0-3 (8 samples) from one photo, 4-7 the other
    result = RecalibratePass(prepared.model, mapping, feeds, sources=sources)(pruned)
    details = result.details
    assert details["split"] == "by source" and details["sources"] == 2 and details["held_out_sources"] == 1
    assert details["sources_on_both_sides"] == 0 and details["held_out_samples"] == 8  # all of one photo
    fit, held = split_by_source(feeds, sources)
    assert [id(f) for f in held] == [id(f) for f in feeds[4:]] and len(fit) == 4
    # without ids the held-out block is contiguous samples, and the report says it is by sample
    plain = RecalibratePass(prepared.model, mapping, feeds)(pruned).details
    assert plain["split"].startswith("by sample") and "held_out_sources" not in plain


def test_the_held_out_side_is_cut_at_whole_sources_so_no_source_is_on_both_sides():
    feeds = [{"x": np.full((1, 2), float(i))} for i in range(48)]
    sources = np.arange(48) % 8  # eight photos, crops interleaved: fold 3 holds photos 3 and 7 (12 crops)
    fit, held = split_by_source(feeds, sources, held=4)  # 4 wanted: the whole first photo of the fold (6)
    held_sources = {int(sources[int(f["x"][0, 0])]) for f in held}
    fit_sources = {int(sources[int(f["x"][0, 0])]) for f in fit}
    assert held_sources == {3} and len(held) == 6 and 3 not in fit_sources and len(fit) == 42
    summary = split_summary(feeds, sources, held)
    assert summary == {"split": "by source", "sources": 8, "held_out_sources": 1, "sources_on_both_sides": 0}
    # one photo only: nothing honest is possible, and the summary shows it
    one = split_summary(feeds, np.zeros(48, int), split_by_source(feeds, np.zeros(48, int))[1])
    assert one["sources"] == 1 and one["sources_on_both_sides"] == 1


def test_prune_passes_the_npz_sources_to_recalibration_and_repair(tmp_path):
    model = two_group_model()
    onnx.save(model, tmp_path / "m.onnx")
    x = np.stack([f["x"] for f in _two_group_feeds(8)])  # 8 feeds of the model's batch 2
    np.savez(tmp_path / "calib.npz", x=x, sources=np.repeat([10, 11, 12, 13], 4))
    _, report = onnx_prune.prune(str(tmp_path / "m.onnx"), ratio=0.25, calib=str(tmp_path / "calib.npz"),
                                 compensate=False, progress=False)
    recalibration = report.details["recalibration"]
    assert recalibration["split"] == "by source" and recalibration["sources"] == 4
    assert recalibration["sources_on_both_sides"] == 0 and recalibration["held_out_samples"] == 4
    _, repaired = onnx_prune.prune(str(tmp_path / "m.onnx"), ratio=0.25, calib=str(tmp_path / "calib.npz"),
                                   repair=True, progress=False)
    assert repaired.details["repair"]["split"] == "by source" and repaired.details["repair"]["sources"] == 4
    from onnx_prune.passes.repair import format_table

    assert "folds (by source, 4 sources)" in format_table(repaired.details["repair"])
    np.savez(tmp_path / "one.npz", x=x, sources=np.zeros(16, int))  # one photo: repair cannot check itself
    with pytest.raises(PruneError, match="at least 2 sources"):
        onnx_prune.prune(str(tmp_path / "m.onnx"), ratio=0.25, calib=str(tmp_path / "one.npz"), repair=True,
                         progress=False)


def test_feeds_stay_a_list_for_every_caller():
    items = [{"x": np.full((1, 2), float(i))} for i in range(3)]
    feeds = Feeds(items, np.array([1, 1, 2]))
    assert isinstance(feeds, list) and len(feeds) == 3 and all(a is b for a, b in zip(feeds, items))
    assert feeds[:2] == items[:2] and feeds.sources.tolist() == [1, 1, 2]
    assert Feeds(items).sources is None
