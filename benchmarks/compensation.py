"""Expected-activation compensation on the pretrained ImageNet MobileNetV2: top-1 agreement with the unpruned
model, pruned with and without compensation, at one MAC target.

    python3 benchmarks/compensation.py [--model models/zoo/mobilenet_v2_imagenet.onnx] [--macs 0.9]
                                       [--criterion l2] [--samples 32]

Statistics are data-free: BatchNorm statistics where the export kept BN nodes, else moments propagated through
the linear layers ("compensated", the default) or measured on 1/f-noise synthetic inputs
("compensated_synthetic", `analysis.expected.synthetic_inputs`).  Agreement is measured on the committed evaluation set
(20 labelled ImageNet images and 300 crops of natural photos, `models/pretrained/imagenet_eval.py`).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "pretrained"))
from imagenet_eval import load_imagenet_eval  # noqa: E402

from onnx_prune.analysis.expected import channel_statistics  # noqa: E402
from onnx_prune.passes.compensate import compensate  # noqa: E402
from onnx_prune.passes.rewrite import ApplyPlanPass  # noqa: E402
from onnx_prune.pipeline import make_plan  # noqa: E402


def predictions(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0].argmax(axis=1)
                           for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "mobilenet_v2_imagenet.onnx"))
    parser.add_argument("--macs", type=float, default=0.9, help="fraction of MACs to keep")
    parser.add_argument("--criterion", default="l2")
    parser.add_argument("--samples", type=int, default=32, help="synthetic images for measured statistics")
    parser.add_argument("--calib-crops", type=int, default=0,
                        help="also compensate with means measured on this many crops of the calibration-side "
                             "photos (models/pretrained/photo_split.py): a diagnostic of the statistics' quality")
    args = parser.parse_args()

    images, _ = load_imagenet_eval()
    plan, prepared = make_plan(args.model, target_macs=args.macs, criterion=args.criterion, compensate=False)
    reference = predictions(prepared.model, images)
    start = time.perf_counter()
    stats = channel_statistics(prepared)
    seconds = time.perf_counter() - start
    result = {"model": Path(args.model).name, "target_macs": args.macs, "criterion": args.criterion,
              "images": len(images), "statistics_seconds": round(seconds, 2),
              "sources": dict(collections.Counter(s.source for s in stats.values()))}
    synthetic = channel_statistics(prepared, samples=args.samples, estimate="synthetic")
    variants = [("plain", plan), ("compensated", compensate(prepared, plan, stats)),
                ("compensated_synthetic", compensate(prepared, plan, synthetic))]
    if args.calib_crops:
        from photo_split import crops, normalize
        calib_images = normalize(crops("calib", args.calib_crops)[0])
        feeds = [{prepared.model.graph.input[0].name: calib_images[i:i + 16]}
                 for i in range(0, len(calib_images), 16)]
        variants.append(("compensated_calib", compensate(prepared, plan, channel_statistics(prepared, calib=feeds))))
    for label, chosen in variants:
        pruned = ApplyPlanPass(prepared.analysis, chosen)(prepared.model).model
        result[label] = round(float(np.mean(predictions(pruned, images) == reference)), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
