"""Fashion-MNIST data: the full set from Debian's ``dataset-fashion-mnist``, and the committed subset.

Only numpy is needed here (no torch), so the tests can import :func:`load_eval`.

The full data set (for training, and for the full 10k test accuracy) is read from the IDX files that Debian's
``dataset-fashion-mnist`` package installs into ``/usr/share/datasets/fashion-mnist``.  Either install it
(``apt-get install dataset-fashion-mnist``) or unpack it anywhere without root and point
``FASHION_MNIST_DIR`` at it::

    apt-get download dataset-fashion-mnist
    dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist
    export FASHION_MNIST_DIR=/tmp/fmnist/usr/share/datasets/fashion-mnist
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EVAL_PATH = HERE / "fmnist_eval.npz"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte IDX files of rank 3 (images) and 1 (labels)


def data_dir() -> Path:
    """The folder with the IDX files: ``$FASHION_MNIST_DIR``, else where Debian installs them."""
    folder = Path(os.environ.get(ENV_VAR, DEFAULT_DIR))
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}).  Get it from Debian: "
            "`apt-get install dataset-fashion-mnist`, or without root: `apt-get download dataset-fashion-mnist "
            "&& dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist` and "
            f"`export {ENV_VAR}=/tmp/fmnist/usr/share/datasets/fashion-mnist`.")
    return folder


def read_idx(path: Path, rank: int) -> np.ndarray:
    """Read a gzipped unsigned-byte IDX file of the given rank."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[rank]:
        raise ValueError(f"{path}: not a rank-{rank} uint8 IDX file (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    return data.reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``'train'`` (60k) or ``'test'`` (10k)."""
    folder = data_dir()
    images_file, labels_file = FILES[split]
    images, labels = read_idx(folder / images_file, 3), read_idx(folder / labels_file, 1)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def normalize(images: np.ndarray) -> np.ndarray:
    """``uint8 [N, 28, 28]`` → the models' input, ``float32 [N, 1, 28, 28]`` standardised."""
    x = images.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD))[:, None, :, :]


def load_eval(path: Path = EVAL_PATH) -> tuple[np.ndarray, np.ndarray]:
    """The committed evaluation subset: model inputs ``float32 [N, 1, 28, 28]`` and labels ``int64 [N]``."""
    with np.load(path) as data:
        return normalize(data["images"]), data["labels"].astype(np.int64)
