"""The committed ImageNet evaluation set (``imagenet_eval.npz``) and its loader; numpy only, no torch.

The file holds, as uint8:

* ``labelled``: 20 ImageNet validation images (from the foolbox wheel), resized to 256 and centre-cropped
  to 224x224, HWC, with their class indices in ``labels``;
* ``photo_<name>``: a few natural photos (scikit-image, scikit-learn samples), resized to a short side of 256;
* ``crop_boxes`` ``[K, 5]`` (photo index, top, left, height, width) and ``crop_flips`` ``[K]``: a fixed-seed
  list of random resized crops (with horizontal flips) of those photos, which :func:`load_imagenet_eval`
  cuts out and resizes to 224x224 (bilinear).  Storing the photos and boxes instead of the crops keeps the
  file small.

The crops have no label (``-1``): they serve to compare a pruned model's predictions with the original's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from photo_split import resize_bilinear  # one resampler for both evaluation sets (this folder is on sys.path)

HERE = Path(__file__).resolve().parent
EVAL_PATH = HERE / "imagenet_eval.npz"
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet normalisation, as torchvision's weights
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
UNLABELLED = -1


def normalize(images_nhwc: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` RGB → float32 ``[N, 3, H, W]`` with ImageNet mean/std."""
    x = images_nhwc.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2))


def crops(data: "np.lib.npyio.NpzFile") -> np.ndarray:
    """The augmented crops described by ``crop_boxes``/``crop_flips``, uint8 ``[K, 224, 224, 3]``."""
    photos = [data[f"photo_{name}"] for name in data["photo_names"]]
    out = []
    for (index, top, left, height, width), flip in zip(data["crop_boxes"], data["crop_flips"]):
        crop = resize_bilinear(photos[index][top: top + height, left: left + width], SIZE)
        out.append(crop[:, ::-1] if flip else crop)
    return np.stack(out) if out else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def load_imagenet_eval(path: Path = EVAL_PATH, with_crops: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs float32 ``[N, 3, 224, 224]`` and labels int64 ``[N]`` (``-1`` for the unlabelled crops).

    The 20 labelled images come first; ``with_crops=False`` returns only those.
    """
    with np.load(path) as data:
        images, labels = data["labelled"], data["labels"].astype(np.int64)
        if with_crops:
            extra = crops(data)
            images = np.concatenate([images, extra])
            labels = np.concatenate([labels, np.full(len(extra), UNLABELLED, np.int64)])
    return normalize(images), labels
