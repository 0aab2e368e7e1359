"""The pretrained ImageNet models' names, files, input normalisation and records; no torch needed.

``build_pretrained.py`` builds the files (with torch); everything that only reads them lives here, so the
benchmark and the tests run on exported files without importing torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import photo_split

HERE = Path(__file__).resolve().parent
ZOO = HERE.parents[1] / "models" / "zoo"
RECORDS = HERE / "pretrained_records.json"  # name -> record (the older mobilenet_v2_imagenet.json stays as it is)
MODELS = ("mobilenet_v2_imagenet", "efficientnet_lite0_imagenet")
KINDS = ("fused", "bn")
# (mean, std) on [0, 1] pixels, per RGB channel
INPUT_NORMALISATION = {
    "mobilenet_v2_imagenet": (tuple(photo_split.IMAGENET_MEAN.tolist()), tuple(photo_split.IMAGENET_STD.tolist())),
    "efficientnet_lite0_imagenet": ((127 / 255,) * 3, (128 / 255,) * 3),  # TF EfficientNet-Lite: (x - 127) / 128
}


def model_path(name: str, kind: str = "fused") -> Path:
    """Where the ONNX file of ``name`` in export ``kind`` lives (``models/zoo``, git-ignored)."""
    if name not in MODELS or kind not in KINDS:
        raise ValueError(f"unknown model/kind {name}/{kind} (models {MODELS}, kinds {KINDS})")
    return ZOO / f"{name}{'' if kind == 'fused' else '_' + kind}.onnx"


def records() -> dict:
    return json.loads(RECORDS.read_text()) if RECORDS.exists() else {}


def logits(model: "Path | onnx.ModelProto", x: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's logits under onnxruntime (CPU)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def labelled_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The labelled evaluation images, normalised for model ``name``, and their classes."""
    images, labels = photo_split.labelled_images()
    return photo_split.normalize(images, *INPUT_NORMALISATION[name]), labels


def kind_error(name: str, x: np.ndarray) -> float:
    """max |logits(bn) - logits(fused)| / max |logits(fused)| on ``x``."""
    fused, kept = logits(model_path(name, "fused"), x), logits(model_path(name, "bn"), x)
    return float(np.abs(kept - fused).max() / np.abs(fused).max())
