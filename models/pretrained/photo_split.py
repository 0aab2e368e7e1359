"""Natural photos split BY PHOTO into an evaluation side and a calibration side, and their augmented crops.

The committed data (built by ``build_photos.py``):

* ``photos/<name>.jpg``: every photo once, resized to a short side of 256 (JPEG quality 90; grey photos as
  grey JPEGs, read as RGB);
* ``photos.json``: per photo its side (``eval`` or ``calib``), source, licence, author and, for the ImageNet
  validation images, the class; the list order within a side is a fixed shuffle, so the first P photos of a
  side mix the sources;
* ``photo_crops.npz``: per side, ``BOXES_PER_PHOTO`` random resized crops (torchvision's rule: scale 0.25-1,
  aspect 3/4-4/3) and horizontal flips for every photo, drawn once with a seeded numpy generator.

No photo has crops on both sides: calibration uses only ``calib`` photos, evaluation only ``eval`` photos.
:func:`crops` takes crops round-robin over the first ``photos`` photos of a side, so a calibration set of N
crops from P distinct photos is well defined for any P.

Decoding needs Pillow (a dependency of matplotlib in the dev extra); the rest is numpy.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHOTOS_DIR = HERE / "photos"
MANIFEST = HERE / "photos.json"
CROPS_PATH = HERE / "photo_crops.npz"
SIDES = ("eval", "calib")
SIZE = 224
BOXES_PER_PHOTO = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@lru_cache(maxsize=1)
def manifest() -> tuple[dict, ...]:
    """Every photo's record (name, side, source, licence, author, label or -1), eval photos first."""
    return tuple(json.loads(MANIFEST.read_text())["photos"])


def side_photos(side: str) -> list[str]:
    """Photo names of ``side`` in their fixed order."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return [p["name"] for p in manifest() if p["side"] == side]


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The photo ``name`` as uint8 RGB ``[H, W, 3]`` (short side 256)."""
    from PIL import Image

    with Image.open(PHOTOS_DIR / f"{name}.jpg") as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def normalize(images_nhwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` RGB → float32 ``[N, 3, H, W]``, ``(pixel / 255 - mean) / std`` per channel."""
    x = images_nhwc.astype(np.float32) / np.float32(255.0)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Resize HWC uint8 ``image`` to ``size`` x ``size`` (bilinear, half-pixel centres), as uint8."""
    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)

    (y0, y1, wy), (x0, x1, wx) = taps(image.shape[0]), taps(image.shape[1])
    img = image.astype(np.float32)
    rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def centre_crop(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top: top + size, left: left + size]


def labelled_images() -> tuple[np.ndarray, np.ndarray]:
    """The evaluation side's ImageNet validation photos, centre-cropped to 224 (uint8 NHWC), and their classes."""
    records = [p for p in manifest() if p["side"] == "eval" and p["label"] >= 0]
    images = [centre_crop(photo(p["name"])) for p in records]
    return np.stack(images), np.array([p["label"] for p in records], dtype=np.int64)


@lru_cache(maxsize=1)
def _boxes() -> dict[str, np.ndarray]:
    with np.load(CROPS_PATH) as data:
        return {key: data[key] for key in data.files}


def crop_plan(side: str, count: int, photos: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Which crops :func:`crops` cuts: ``count`` (photo name, box row ``[top, left, height, width, flip]``),
    round-robin over the first ``photos`` photos of ``side`` (all by default), each photo's boxes in order."""
    names = side_photos(side)
    if photos is not None:
        if not 1 <= photos <= len(names):
            raise ValueError(f"the {side} side has {len(names)} photos, asked for {photos}")
        names = names[:photos]
    if count > BOXES_PER_PHOTO * len(names):
        raise ValueError(f"{count} crops from {len(names)} photos: at most {BOXES_PER_PHOTO} per photo are stored")
    boxes = _boxes()
    return [(names[k % len(names)], boxes[f"{side}/{names[k % len(names)]}"][k // len(names)])
            for k in range(count)]


def crops(side: str, count: int, photos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` augmented crops of ``side`` (uint8 ``[count, 224, 224, 3]``) and the photo index of each
    (position in :func:`side_photos`)."""
    names = side_photos(side)
    out, source = [], []
    for name, (top, left, height, width, flip) in crop_plan(side, count, photos):
        crop = resize_bilinear(photo(name)[top: top + height, left: left + width], SIZE)
        out.append(crop[:, ::-1] if flip else crop)
        source.append(names.index(name))
    images = np.stack(out) if out else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, np.array(source, dtype=np.int64)
