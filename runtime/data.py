"""User data in: feeds (input name -> array) from .npz/.npy files, image folders and data-loader scripts.

One entry point, `load_data(spec, model, ...)`, turns what users hold into onnxruntime feeds the model accepts:

- `.npz`: input name -> array. An array with the model input's rank is N samples along its batch axis (split
  into feeds of the declared batch, or of 1 for a dynamic batch); one more axis is a stack of feeds. A
  single-input model takes the one array of rank >= 2 whatever its name. `label`/`labels` arrays are labels.
  A `sources` (or `source`) array gives each sample's source id (int or str): what it was cut from, e.g. the
  photo of a crop, one per sample (or [feeds, batch] for a stack of feeds); never taken as a model input unless
  the model has an input of that name.
- `.npy`: one array for a single-input model.
- a folder: image files (PNG, JPEG, BMP, WebP; sorted by path) for a single image input, preprocessed
  explicitly: resized to `image_size` (default: the model's H, W), pixels scaled to [0, 1], `(x - mean) / std`
  per channel, in the model's `layout` (NCHW/NHWC) and `color` order (RGB/BGR/GRAY). Each file is its own
  source (its path under the folder): sub-folders are often classes, not photos, so they do not group sources;
  give crops of one photo as an .npz with `sources` (or a .py loader) to keep them together.
- `PATH[a:b]`: feeds a to b of any of these (samples, for a dynamic batch), e.g. `eval.npz[:256]` to
  calibrate and `eval.npz[256:]` to validate on one file; source ids are sliced with them.
- `.py`: a data-loader script defining `load_data()` that yields feed dicts (polygraphy's convention); a
  `label`/`labels` entry of a feed is taken as that feed's labels, a `source`/`sources` entry as the source id
  of its samples (one id for the whole feed, or one per sample; every feed or none).

Source ids let calibration hold out whole sources (`passes.obs.split_by_source`): with crops of a few photos,
a check on held-out crops of the *fitted* photos cannot see overfitting. `load_feeds` returns `Feeds`, a list of
feed dicts that also carries them (`.sources`, None when the data does not tell).

Integer pixel arrays (uint8) fed to a float input are images too: scaled to [0, 1], then normalised by
`mean`/`std`, and a missing channel axis is added for a one-channel model. NaN or Inf anywhere is refused.
Every problem raises `DataError` (a `PruneError` and a `ValueError`) with one line.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from onnx_prune.errors import PruneError

from .sessions import InputSpec, ModelLike, input_specs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABEL_KEYS = ("label", "labels")
SOURCE_KEYS = ("source", "sources")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR", "GRAY")


class DataError(PruneError, ValueError):
    """Data the model cannot take (wrong names, shapes, types, values), in one line."""


@dataclass(frozen=True)
class Preprocessing:
    """How images (files, or uint8 arrays) become model input; None = derived from the model's input."""
    image_size: tuple[int, int] | None = None  # (H, W)
    mean: tuple[float, ...] | None = None  # per channel, on pixels in [0, 1]
    std: tuple[float, ...] | None = None
    layout: str | None = None  # the model's: NCHW or NHWC
    color: str | None = None  # channel order the model wants: RGB, BGR or GRAY

    @classmethod
    def of(cls, image_size=None, mean=None, std=None, layout=None, color=None) -> "Preprocessing":
        """Checked values from keywords (CLI strings like "224,224" or "0.485,0.456,0.406" accepted)."""
        size = _numbers(image_size, int, "image_size")
        if size is not None:
            size = tuple(size) * 2 if len(size) == 1 else tuple(size)
            if len(size) != 2 or min(size) < 1:
                raise DataError(f"image size must be H,W (or one size for both) of positive integers, got {image_size}")
        mean_values, std_values = _numbers(mean, float, "mean"), _numbers(std, float, "std")
        if std_values is not None and any(not np.isfinite(s) or s <= 0 for s in std_values):
            raise DataError(f"std must be positive, got {std}")
        if mean_values is not None and not all(np.isfinite(mean_values)):
            raise DataError(f"mean must be finite, got {mean}")
        layout = None if layout is None else str(layout).upper()
        if layout is not None and layout not in LAYOUTS:
            raise DataError(f"layout must be NCHW or NHWC, got {layout}")
        color = None if color is None else str(color).upper()
        if color is not None and color not in COLORS:
            raise DataError(f"color must be RGB, BGR or GRAY, got {color}")
        return cls(size, None if mean_values is None else tuple(mean_values),
                   None if std_values is None else tuple(std_values), layout, color)


def _numbers(value, kind, what: str):
    if value is None:
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else (
        list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value])
    try:
        return [kind(item) for item in items]
    except (TypeError, ValueError):
        raise DataError(f"{what}: expected numbers, got {value!r}") from None


@dataclass
class Dataset:
    """Feeds ready for onnxruntime, with labels when the data had them."""
    feeds: list[dict[str, np.ndarray]]
    source: str  # what the data was, for messages: "256 samples from calib.npz"
    labels: np.ndarray | None = None  # one class id per sample, in feed order
    synthetic: bool = False  # generated, not the user's data
    notes: list[str] = field(default_factory=list)  # choices made on the user's behalf, to print
    sources: np.ndarray | None = None  # one source id (int or str) per sample, in feed order; None: unknown

    @property
    def samples(self) -> int:
        """Samples in all feeds (batch elements, not feeds)."""
        return sum(_feed_batch(feed) for feed in self.feeds)


def _feed_batch(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


class Feeds(list):
    """A list of feed dicts that also carries each sample's source id (`sources`: an array in sample order, or
    None when the data does not tell), so they travel together wherever the feeds go."""

    def __init__(self, feeds=(), sources: np.ndarray | None = None):
        super().__init__(feeds)
        self.sources = sources


def feed_sources(feeds) -> np.ndarray | None:
    """The per-sample source ids `feeds` carry (a `Feeds`), else None."""
    return getattr(feeds, "sources", None)


def load_feeds(spec, model: ModelLike, **preprocessing) -> Feeds:
    """Feeds for `model` from a path (.npz, .npy, image folder, .py loader) or in-memory data; see the module doc.

    `preprocessing`: image_size, mean, std, layout, color (see `Preprocessing`). Raises DataError.  The result
    is a list of feed dicts carrying the samples' source ids (`Feeds.sources`).
    """
    dataset = load_data(spec, model, **preprocessing)
    return Feeds(dataset.feeds, dataset.sources)


def load_data(spec, model: ModelLike, labels=None, **preprocessing) -> Dataset:
    """A `Dataset` for `model` from `spec`: a path (.npz, .npy, folder of images, .py loader), a feed dict or
    list of feed dicts, or one array (single-input models). `labels`: a path (.npy/.npz/.txt) or an array of
    class ids; otherwise `label`/`labels` arrays found in the data are used."""
    prep = Preprocessing.of(**preprocessing)
    specs = input_specs(model)
    selected = None
    if isinstance(spec, (str, os.PathLike)) and not Path(spec).exists():
        spec, selected = _split_selection(os.fspath(spec))
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.exists():
            raise DataError(f"no such file or folder: {path}")
        if path.is_dir():
            dataset = _image_folder(path, specs, prep)
        elif path.suffix == ".py":
            dataset = _loader_script(path, specs, prep)
        elif path.suffix == ".npy":
            dataset = _arrays({"<npy>": _read_npy(path)}, specs, prep, path.name)
        else:
            dataset = _arrays(_read_npz(path), specs, prep, path.name)
    elif isinstance(spec, np.ndarray):
        dataset = _arrays({"<array>": spec}, specs, prep, "the given array")
    elif isinstance(spec, Mapping):
        dataset = _arrays(dict(spec), specs, prep, "the given arrays")
    elif isinstance(spec, Iterable):
        dataset = _feed_list(list(spec), specs, prep, "the given feeds")
    else:
        raise DataError(f"data must be a path, an array, a dict of arrays or a list of feed dicts, "
                        f"not {type(spec).__name__}")
    if labels is not None:
        dataset.labels = read_labels(labels)
    if dataset.labels is not None:
        dataset.labels = _checked_labels(dataset.labels, dataset.samples)
    if dataset.sources is not None:
        dataset.sources = _checked_sources(dataset.sources, dataset.samples, dataset.source)
    if selected is not None:
        dataset = _select(dataset, selected)
    if not dataset.feeds:
        raise DataError(f"{dataset.source}: no samples")
    return dataset


_SELECTION = re.compile(r"^(.*)\[(-?\d*):(-?\d*)\]$")


def _split_selection(text: str) -> tuple[str, slice | None]:
    """'data.npz[:256]' -> ('data.npz', slice(None, 256)): a range of feeds (samples, for a dynamic batch)."""
    match = _SELECTION.match(text)
    if not match:
        return text, None
    start, stop = (int(v) if v else None for v in match.group(2, 3))
    return match.group(1), slice(start, stop)


def _select(dataset: Dataset, selected: slice) -> Dataset:
    """The feeds in `selected` (and their labels)."""
    bounds = np.cumsum([0] + [_feed_batch(f) for f in dataset.feeds])
    indices = range(len(dataset.feeds))[selected]
    feeds = [dataset.feeds[i] for i in indices]
    def per_sample(values):
        if values is None:
            return None
        return np.concatenate([values[bounds[i]:bounds[i + 1]] for i in indices]) if feeds else values[:0]

    labels, sources = per_sample(dataset.labels), per_sample(dataset.sources)
    count = sum(_feed_batch(f) for f in feeds)
    where = f"[{'' if selected.start is None else selected.start}:{'' if selected.stop is None else selected.stop}]"
    source = re.sub(r"^\d+ (sample|image)s? from (.*)$",
                    lambda m: f"{count} {m.group(1)}{'s' * (count != 1)} from {m.group(2)}{where}", dataset.source)
    if not feeds:
        raise DataError(f"{source}: the range selects no samples")
    return Dataset(feeds, source, labels, dataset.synthetic, list(dataset.notes), sources)


# --- .npz / .npy / arrays ----------------------------------------------------------


NPZ_MAGIC, NPY_MAGIC = b"PK", b"\x93NUMPY"


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(6)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    magic = _magic(path)
    if magic.startswith(NPY_MAGIC):
        return {"<npy>": _read_npy(path)}
    if not magic.startswith(NPZ_MAGIC):
        raise DataError(f"{path}: not a readable .npz file (numpy's zip of arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, ValueError) and "pickle" in str(err).lower():
            raise DataError(f"{path}: holds Python objects (pickled); save plain numeric arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    except Exception as err:  # zipfile.BadZipFile and friends
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None


def _read_npy(path: Path) -> np.ndarray:
    if not _magic(path).startswith(NPY_MAGIC):
        raise DataError(f"{path}: not a readable .npy file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from None


def _assign_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Input name -> array; a single-input model takes the lone candidate array whatever its name."""
    names = [spec.name for spec in specs]
    data = {k: v for k, v in arrays.items() if k not in LABEL_KEYS + SOURCE_KEYS or k in names}
    if not data and not arrays:
        raise DataError(f"{source}: holds no arrays")
    if all(name in data for name in names):
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise DataError(f"{source}: unknown arrays {unknown}; model inputs are {names}")
        return {name: data[name] for name in names}, []
    if len(names) == 1:
        candidates = [k for k, v in data.items() if np.ndim(v) >= 2]
        if len(candidates) == 1:
            chosen = candidates[0]
            note = [] if chosen.startswith("<") else [f"array {chosen!r} of {source} feeds input {names[0]!r}"]
            return {names[0]: data[chosen]}, note
    missing = [name for name in names if name not in data]
    unknown = sorted(set(data) - set(names))
    raise DataError(f"{source}: missing arrays for {missing}, unknown arrays {unknown}; model inputs are {names}")


def _arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec], prep: Preprocessing, source: str) -> Dataset:
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays and k not in {s.name for s in specs}), None)
    sources = next((arrays[k] for k in SOURCE_KEYS if k in arrays and k not in {s.name for s in specs}), None)
    assigned, notes = _assign_arrays(arrays, specs, source)
    stacks = {}
    for spec in specs:
        array = np.asarray(assigned[spec.name])
        if _is_pixels(array, spec):
            notes.append(f"{spec.name!r}: uint8 pixels scaled to [0, 1]"
                         + (f", then (x - {list(prep.mean or [0])}) / {list(prep.std or [1])}"
                            if prep.mean or prep.std else " (no mean=/std= given)"))
        stacks[spec.name] = _as_feed_stack(array, spec, prep, source)
    counts = {name: len(stack) for name, stack in stacks.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{source}: inputs hold different numbers of samples: {counts}")
    count = next(iter(counts.values()), 0)
    feeds = [{name: stack[index] for name, stack in stacks.items()} for index in range(count)]
    samples = sum(_feed_batch(f) for f in feeds)
    return Dataset(feeds, f"{samples} sample{'s' * (samples != 1)} from {source}",
                   None if labels is None else np.asarray(labels), notes=notes,
                   sources=None if sources is None else np.asarray(sources).reshape(-1))


def _is_pixels(array: np.ndarray, spec: InputSpec) -> bool:
    return array.dtype == np.uint8 and spec.dtype.kind == "f"


def _channel_axis(spec: InputSpec, prep: Preprocessing) -> int | None:
    """Channel axis of a rank-4 image input: the layout's, or axis 1 unless the last dim looks like colours."""
    if spec.dims is None or len(spec.dims) != 4:
        return None
    if prep.layout:
        return 1 if prep.layout == "NCHW" else 3
    last, second = spec.dims[3], spec.dims[1]
    return 3 if last in (1, 3) and second not in (1, 3) else 1


def _as_feed_stack(array: np.ndarray, spec: InputSpec, prep: Preprocessing, source: str) -> np.ndarray:
    """[feeds, *input shape] for one input; see the module doc for how samples are found."""
    where = f"{source}: {spec.name!r}"
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where} is {array.dtype}, not a numeric array")
    rank = array.ndim if spec.dims is None else len(spec.dims)
    channel_axis = _channel_axis(spec, prep)
    if _is_pixels(array, spec) and array.ndim == rank - 1 and channel_axis is not None \
            and spec.dims[channel_axis] == 1:
        array = np.expand_dims(array, channel_axis)  # [N, H, W] grey images for a one-channel model
    if _is_pixels(array, spec):
        array = _normalize_pixels(array.astype(np.float32) / np.float32(255.0), channel_axis, prep,
                                  array.ndim - rank)
    if array.ndim == rank:
        array = _split_batch(array, spec, where)
    elif array.ndim != rank + 1:
        raise DataError(f"{where} has rank {array.ndim}; the model input has rank {rank} "
                        f"({rank + 1} with a leading axis of feeds)")
    for axis, dim in enumerate(spec.dims or ()):
        if isinstance(dim, int) and array.shape[axis + 1] != dim:
            raise DataError(f"{where} dim {axis} is {array.shape[axis + 1]}, the model fixes it to {dim}")
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise DataError(f"{where} is {array.dtype}, the model wants {spec.dtype}")
    _refuse_non_finite(array, where)
    return array.astype(spec.dtype, copy=False)


def _split_batch(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """N samples along the batch axis -> [feeds, batch, ...]: feeds of the declared batch, or of 1 if dynamic."""
    declared = spec.dims[0] if spec.dims else None
    size = declared if isinstance(declared, int) and declared > 0 else 1
    if len(array) % size:
        raise DataError(f"{where} holds {len(array)} samples, not a multiple of the model's batch {size}")
    return array.reshape(len(array) // size, size, *array.shape[1:])


def _normalize_pixels(x: np.ndarray, channel_axis: int | None, prep: Preprocessing, extra_axes: int) -> np.ndarray:
    """(x - mean) / std along the channel axis (shifted by `extra_axes` leading feed axes)."""
    if prep.mean is None and prep.std is None:
        return x
    axis = (channel_axis if channel_axis is not None else 1) + extra_axes
    channels = x.shape[axis] if x.ndim > axis else 1
    mean = _per_channel(prep.mean, 0.0, channels, "mean")
    std = _per_channel(prep.std, 1.0, channels, "std")
    shape = [1] * x.ndim
    if x.ndim > axis:
        shape[axis] = channels
    return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def _per_channel(values, default: float, channels: int, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    if len(values) == 1:
        return np.full(channels, values[0], np.float32)
    if len(values) != channels:
        raise DataError(f"{what}= has {len(values)} values for {channels} channels")
    return np.asarray(values, np.float32)


def _refuse_non_finite(array: np.ndarray, where: str) -> None:
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            kinds = " and ".join(k for k, m in (("NaN", np.isnan(array)), ("Inf", np.isinf(array))) if m.any())
            raise DataError(f"{where} contains {kinds} ({int(bad.sum())} of {array.size} values); "
                            "clean the data first")


# --- image folders --------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path: the sample order labels refer to."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image_input(specs: list[InputSpec], source: str) -> InputSpec:
    images = [s for s in specs if s.dims is not None and len(s.dims) == 4 and s.dtype.kind in "fu"]
    if len(specs) != 1 or len(images) != 1:
        raise DataError(f"{source}: an image folder feeds a model with one image input (rank 4); this model has "
                        f"inputs {[s.name for s in specs]} (use an .npz or a .py data loader)")
    return images[0]


def _image_plan(spec: InputSpec, prep: Preprocessing, source: str) -> tuple[str, str, tuple[int, int]]:
    """(layout, color, (H, W)) from the options, else from the model's declared input shape."""
    layout = "NCHW" if _channel_axis(spec, prep) == 1 else "NHWC"
    c_axis, (h_axis, w_axis) = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = spec.dims[c_axis]
    color = prep.color or ("GRAY" if channels == 1 else "RGB")
    wanted = 1 if color == "GRAY" else 3
    if isinstance(channels, int) and channels != wanted:
        raise DataError(f"{source}: color= {color} gives {wanted} channel(s), the model input has {channels} "
                        f"({layout}; give layout= if that is wrong)")
    size = prep.image_size
    if size is None:
        h, w = spec.dims[h_axis], spec.dims[w_axis]
        if not (isinstance(h, int) and isinstance(w, int)):
            raise DataError(f"{source}: the model's image size is dynamic; give image_size= H,W")
        size = (h, w)
    return layout, color, size


def _read_image(path: Path, color: str, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] float32 in [0, 1], resized (bilinear) to `size`, channels in `color` order."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # a dependency; only a broken install lacks it
        raise DataError("reading images needs Pillow: pip install Pillow") from None
    try:
        with Image.open(path) as image:
            image = image.convert("L" if color == "GRAY" else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return pixels[:, :, ::-1] if color == "BGR" else pixels


def _image_folder(folder: Path, specs: list[InputSpec], prep: Preprocessing) -> Dataset:
    source = f"{folder}/"
    spec = _image_input(specs, source)
    files = image_files(folder)
    if not files:
        raise DataError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    layout, color, size = _image_plan(spec, prep, source)
    images = np.stack([_read_image(p, color, size) for p in files])  # [N, H, W, C]
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    images = _normalize_pixels(np.ascontiguousarray(images), 1 if layout == "NCHW" else 3, prep, 0)
    stack = _split_batch(images, spec, source)
    if not np.can_cast(stack.dtype, spec.dtype, casting="same_kind"):
        raise DataError(f"{source}: images are float, the model input {spec.name!r} is {spec.dtype}")
    feeds = [{spec.name: feed.astype(spec.dtype, copy=False)} for feed in stack]
    note = (f"images: {len(files)} files resized to {size[0]}x{size[1]}, {color}, {layout}, scaled to [0, 1]"
            + (f", mean {list(prep.mean)}" if prep.mean else "") + (f", std {list(prep.std)}" if prep.std else ""))
    # one source per file (sub-folders are often classes, not photos): crops of one photo come as an .npz
    sources = np.array([p.relative_to(folder).as_posix() for p in files])
    return Dataset(feeds, f"{len(files)} image{'s' * (len(files) != 1)} from {source}", notes=[note],
                   sources=sources)


# --- data-loader scripts ---------------------------------------------------------------


def _loader_script(path: Path, specs: list[InputSpec], prep: Preprocessing) -> Dataset:
    """Run `load_data()` of a user's script (polygraphy's data-loader convention)."""
    module_name = f"_onnx_prune_data_loader_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise DataError(f"{path}: cannot load as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
        load = getattr(module, "load_data", None)
        if not callable(load):
            raise DataError(f"{path}: defines no load_data() function")
        items = list(load())
    except DataError:
        raise
    except Exception as err:  # the user's code: its failure is an input error, reported in one line
        raise DataError(f"{path}: load_data() raised {type(err).__name__}: {err}") from None
    return _feed_list(items, specs, prep, path.name)


def _feed_list(items: list, specs: list[InputSpec], prep: Preprocessing, source: str) -> Dataset:
    """Feed dicts as given (each one run as is), checked against the model; `label(s)` entries are labels."""
    feeds, labels, sources = [], [], []
    names = [spec.name for spec in specs]
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"{source}: item {index} is a {type(item).__name__}, not a dict of input name -> array")
        item = dict(item)
        label = next((item.pop(k) for k in LABEL_KEYS if k in item and k not in names), None)
        if label is not None:
            labels.append(np.atleast_1d(np.asarray(label)))
        item_source = next((item.pop(k) for k in SOURCE_KEYS if k in item and k not in names), None)
        feed = {}
        for spec in specs:
            if spec.name not in item:
                raise DataError(f"{source}: item {index} has no {spec.name!r} (has {sorted(item)}); model inputs "
                                f"are {names}")
            stack = _as_feed_stack(np.asarray(item.pop(spec.name))[np.newaxis], spec, prep, f"{source} item {index}")
            feed[spec.name] = stack[0]
        if item:
            raise DataError(f"{source}: item {index} has unknown entries {sorted(item)}; model inputs are {names}")
        feeds.append(feed)
        if item_source is not None:  # one id for the feed's samples, or one per sample
            ids = np.asarray(item_source).reshape(-1)
            sources.append(np.repeat(ids, _feed_batch(feed)) if ids.size == 1 else ids)
    if labels and len(labels) != len(feeds):
        raise DataError(f"{source}: {len(labels)} of {len(feeds)} feeds carry labels; give all or none")
    if sources and len(sources) != len(feeds):
        raise DataError(f"{source}: {len(sources)} of {len(feeds)} feeds carry a source; give all or none")
    samples = sum(_feed_batch(f) for f in feeds)
    return Dataset(feeds, f"{samples} sample{'s' * (samples != 1)} from {source}",
                   np.concatenate(labels) if labels else None, sources=_joined(sources, source))


# --- labels --------------------------------------------------------------------------------


def read_labels(spec) -> np.ndarray:
    """Class ids from an array, a .npy, a .npz (its `label`/`labels` array, or its only array) or a text file
    of integers (whitespace or comma separated)."""
    if not isinstance(spec, (str, os.PathLike)):
        return np.asarray(spec)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"no such labels file: {path}")
    if path.suffix == ".npy":
        return _read_npy(path)
    if path.suffix == ".npz":
        arrays = _read_npz(path)
        found = [arrays[k] for k in LABEL_KEYS if k in arrays] or (list(arrays.values()) if len(arrays) == 1 else [])
        if not found:
            raise DataError(f"{path}: no 'label' or 'labels' array (has {sorted(arrays)})")
        return found[0]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable text file of class ids ({err})") from None
    try:
        return np.array([int(tok) for tok in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path}: expected integer class ids ({err})") from None


def _checked_labels(labels: np.ndarray, samples: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError("labels must be integer class ids (found NaN, Inf or fractions)")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"labels must be integer class ids, not {labels.dtype}")
    if len(labels) != samples:
        raise DataError(f"{len(labels)} labels for {samples} samples; give one class id per sample")
    if len(labels) and labels.min() < 0:
        raise DataError(f"labels must be class ids >= 0, found {labels.min()}")
    return labels.astype(np.int64)


# --- sources ------------------------------------------------------------------------------


def _joined(parts: list[np.ndarray], where: str) -> np.ndarray | None:
    """Per-feed source ids in one array (ints and strings do not mix)."""
    if not parts:
        return None
    kinds = {"str" if p.dtype.kind in "US" else p.dtype.kind for p in parts}
    if len(kinds) > 1:
        raise DataError(f"{where}: source ids mix strings and numbers; use one kind")
    return np.concatenate(parts)


def _checked_sources(sources, samples: int, where: str) -> np.ndarray:
    """One integer or string id per sample (a [feeds, batch] array is flattened in feed order)."""
    sources = np.asarray(sources).reshape(-1)
    if sources.dtype.kind not in "iuUS":
        raise DataError(f"{where}: source ids must be integers or strings, not {sources.dtype}")
    if len(sources) != samples:
        raise DataError(f"{where}: {len(sources)} source ids for {samples} samples; give one per sample")
    return sources


def split_summary(feeds: list[dict], sources, held: list[dict]) -> dict:
    """How `held` (feeds taken out of `feeds`, by identity) was held out: "by source" with the number of
    distinct sources on each side and how many appear on both (0 = an honest split), or "by sample" without
    source ids (held-out samples may then come from the photos that were fitted)."""
    if sources is None:
        return {"split": "by sample (no source ids)"}
    bounds = np.cumsum([0] + [_feed_batch(f) for f in feeds])
    held_ids = {id(f) for f in held}
    sides = {True: set(), False: set()}
    for index, feed in enumerate(feeds):
        sides[id(feed) in held_ids].update(np.asarray(sources)[bounds[index]:bounds[index + 1]].tolist())
    return {"split": "by source", "sources": len(sides[True] | sides[False]), "held_out_sources": len(sides[True]),
            "sources_on_both_sides": len(sides[True] & sides[False])}


PREPROCESSING_FIELDS = ("image_size", "mean", "std", "layout", "color")


def preprocessing_options(options) -> dict:
    """The image preprocessing keywords of `load_feeds` from a PruneOptions (or any object with those fields)."""
    return {name: getattr(options, name, None) for name in PREPROCESSING_FIELDS}
