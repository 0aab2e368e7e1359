"""Second-order calibrated pruning of the pretrained ImageNet MobileNetV2, calibrated and evaluated on crops of
DIFFERENT photos (models/pretrained/photo_split.py: no photo has crops on both sides).

    python benchmarks/obs_imagenet.py [--keep 0.8] [--calib 256] [--photos all] [--eval 256]
                                      [--methods l2,l2+repair,obs] [--json FILE]

Top-1 agreement with the unpruned model on the evaluation crops.  `obs` = obs_prune: damage-curve allocation,
group OBS selection, reconstruction by repair with folds split by calibration photo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "pretrained"))

from onnx_prune.passes.constraints import Target  # noqa: E402
from onnx_prune.passes.obs import obs_prune  # noqa: E402
from onnx_prune.passes.repair import repair  # noqa: E402
from onnx_prune.passes.rewrite import ApplyPlanPass  # noqa: E402
from onnx_prune.pipeline import PruneOptions, build_plan, prepare  # noqa: E402
from onnx_prune.runtime.cost import count_cost  # noqa: E402


def predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    import photo_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "mobilenet_v2_imagenet.onnx"))
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--photos", type=int, default=None, help="distinct calibration photos (default: all)")
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--methods", default="l2,l2+repair,obs")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--curves", default=None, help="damage curves cache (JSON): read if present, else written")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    calib_images, sources = photo_split.crops("calib", args.calib, args.photos)
    eval_images, _ = photo_split.crops("eval", args.eval)
    calib, test = photo_split.normalize(calib_images), photo_split.normalize(eval_images)
    prepared = prepare(args.model)
    name = prepared.model.graph.input[0].name
    feeds = [{name: calib[i:i + 1]} for i in range(len(calib))]
    reference = predict(prepared.model, test).argmax(1)
    macs = count_cost(prepared.model).macs
    methods = args.methods.split(",")
    rows = []

    def record(method, model, started, extra=None):
        agreement = float((predict(model, test).argmax(1) == reference).mean())
        row = {"method": method, "keep_macs": round(count_cost(model).macs / macs, 4), "agreement": agreement,
               "calib": args.calib, "photos": int(len(np.unique(sources))), "eval": args.eval,
               "seconds": round(time.perf_counter() - started, 1), **(extra or {})}
        rows.append(row)
        print(f"{method:12s} MACs {row['keep_macs']:.3f}  agreement {agreement:.4f}  "
              f"({row['photos']} calibration photos, {row['seconds']} s)", file=sys.stderr, flush=True)

    started = time.perf_counter()
    base = build_plan(prepared, PruneOptions(target_macs=args.keep), count_cost(prepared.model))
    pruned = ApplyPlanPass(prepared.analysis, base)(prepared.model).model
    if "l2" in methods:
        record("l2", pruned, started)
    if "l2+repair" in methods:
        repaired, _ = repair(prepared.model, pruned, feeds, prepared.analysis, base, sources=sources,
                             rows=args.positions * len(feeds))
        record("l2+repair", repaired, started)
    if "obs" in methods:
        started = time.perf_counter()
        from onnx_prune.passes.obs import DamageCurve

        curves = None
        if args.curves and Path(args.curves).exists():
            curves = {int(g): DamageCurve(**c) for g, c in json.loads(Path(args.curves).read_text()).items()}
        model, details, _ = obs_prune(prepared, Target(macs=args.keep), feeds, sources, positions=args.positions,
                                      damage_samples=32, quiet=args.quiet, curves=curves)
        if args.curves and curves is None:
            Path(args.curves).write_text(json.dumps(details["damage_curves"]))
        record("obs", model, started, {"allocation": details["allocation_per_group"]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
