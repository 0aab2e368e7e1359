"""Second-order calibrated pruning (passes/obs.py) against data-free pruning and select-then-repair.

    python benchmarks/obs_quality.py [--models resnet20,mobilenet_v2,densenet,se_net] [--keep 0.5]
                                     [--calib 256] [--json benchmarks/results/obs_quality.json]

Fashion-MNIST nets (models/trained/): the first `--calib` images of the committed evaluation subset calibrate,
the rest evaluate (accuracy, and top-1 agreement with the unpruned model).  Every method keeps the same number
of channels per group (the uniform allocation that reaches the MAC target with the default criterion), so the
rows compare selection and reconstruction only; `obs+damage` lets the measured damage curves allocate.
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
sys.path.insert(0, str(ROOT / "models" / "trained"))

from onnx_prune.passes.constraints import Target  # noqa: E402
from onnx_prune.passes.obs import obs_plan, obs_prune  # noqa: E402
from onnx_prune.passes.repair import repair  # noqa: E402
from onnx_prune.passes.rewrite import ApplyPlanPass  # noqa: E402
from onnx_prune.pipeline import PruneOptions, build_plan, prepare  # noqa: E402
from onnx_prune.runtime.cost import count_cost  # noqa: E402


def predict(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def run_model(name: str, keep: float, calib_count: int, quiet: bool, only: set | None = None) -> list[dict]:
    import fashion_mnist

    images, labels = fashion_mnist.load_eval()
    calib, test, test_labels = images[:calib_count], images[calib_count:], labels[calib_count:]
    prepared = prepare(str(ROOT / "models" / "trained" / f"{name}.onnx"))
    input_name = prepared.model.graph.input[0].name
    feeds = [{input_name: calib[i:i + 1]} for i in range(len(calib))]
    reference = predict(prepared.model, test)
    macs = count_cost(prepared.model).macs
    rows = [{"model": name, "method": "unpruned", "keep_macs": 1.0, "accuracy": float((reference.argmax(1) == test_labels).mean()),
             "agreement": 1.0, "seconds": 0.0}]

    def record(method, model, started, extra=None):
        if only and method not in only:
            return
        logits = predict(model, test)
        row = {"model": name, "method": method, "keep_macs": round(count_cost(model).macs / macs, 4),
               "accuracy": float((logits.argmax(1) == test_labels).mean()),
               "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
               "seconds": round(time.perf_counter() - started, 1), **(extra or {})}
        rows.append(row)
        print(f"{name:13s} {method:22s} MACs {row['keep_macs']:.3f}  acc {row['accuracy']:.4f}  "
              f"agree {row['agreement']:.4f}  ({row['seconds']} s)", file=sys.stderr, flush=True)

    started = time.perf_counter()
    base = build_plan(prepared, PruneOptions(target_macs=keep), count_cost(prepared.model))
    pruned = ApplyPlanPass(prepared.analysis, base)(prepared.model).model
    record("l2 (data-free)", pruned, started)
    if not only or "l2 + repair" in only:
        repaired, _ = repair(prepared.model, pruned, feeds, prepared.analysis, base)
        record("l2 + repair", repaired, started)
    counts = {g: len(p.keep) for g, p in base.groups.items()}
    if not only or {"obs selection only", "obs + repair"} & only:
        started = time.perf_counter()
        plan, details = obs_plan(prepared, counts, feeds, quiet=quiet)
        selected = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
        record("obs selection only", selected, started)
        repaired, report = repair(prepared.model, selected, feeds, prepared.analysis, plan,
                                  rows=128 * len(feeds))
        record("obs + repair", repaired, started,
               {"effective_samples": {l["node"]: round(l["effective_samples"]) for l in report["layers"]}})
    if not only or "obs + damage allocation" in only:
        started = time.perf_counter()
        model, details, _ = obs_prune(prepared, Target(macs=keep), feeds, quiet=quiet)
        record("obs + damage allocation", model, started,
               {"allocation": {k: v["kept"] for k, v in details["allocation_per_group"].items()}})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mobilenet_v2,densenet,se_net")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--calib", type=int, default=256, help="calibration images (the rest evaluate)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated method labels to run (default: all)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.keep, args.calib, args.quiet,
                          set(args.only.split(",")) if args.only else None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
