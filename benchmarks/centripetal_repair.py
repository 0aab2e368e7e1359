"""Prune vs prune + repair vs centripetal vs centripetal + repair, at equal MACs.

    python benchmarks/centripetal_repair.py [--models resnet20,mobilenet_v2,...] [--keep 0.7,0.5]
                                            [--calib 384] [--feed-batch 32] [--rows 4096] [--ridge 1e-3]

Every model is BatchNorm-folded first (`prepare_folded`; the same function) and reduced to the same MAC
fraction by each method: `prune` = l2 / domino-o / uniform allocation, `centripetal` = k-means
cluster-and-merge with the same kept counts, each optionally followed by the least-squares repair
(`passes/repair.py`) on calibration data.
- Fashion-MNIST nets of `models/trained/` (used when any is there): accuracy on the committed evaluation
  subset `fmnist_eval.npz` minus its first `--calib` images, which are the calibration data (disjoint).
- Otherwise zoo models (random weights; default squeezenet1_1): relative error of the outputs
  and top-1 agreement with the original on generated inputs, calibration on other generated inputs.
Writes `benchmarks/results/centripetal_repair.md` (also printed) with the machine and the command.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_prune.passes.allocate import Target
from onnx_prune.passes.repair import repair
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import PruneOptions, build_plan, method_plan, prepare_folded
from onnx_prune.runtime.cost import count_cost

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "trained"
ZOO_DEFAULT = ("squeezenet1_1",)
sys.path[:0] = [str(TRAINED), str(ROOT / "tests")]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def predict(model: onnx.ModelProto, images: np.ndarray, batch: int = 250) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def load(name: str, calib: int, feed_batch: int, trained: Path = TRAINED):
    """(model path, calibration feeds, evaluation images, labels or None)."""
    path = trained / f"{name}.onnx"
    if path.exists():
        import fashion_mnist

        images, labels = fashion_mnist.load_eval()
        input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
        feeds = [{input_name: images[i:i + feed_batch]} for i in range(0, calib, feed_batch)]
        return path, feeds, images[calib:], labels[calib:]
    from conftest import zoo_model
    from invariants import feeds_for

    path = zoo_model(name, "torchscript")
    model = onnx.load(str(path), load_external_data=False)
    feeds = feeds_for(model, seed=1, batch=1, samples=max(calib // 64, 4))
    images = np.concatenate([f[model.graph.input[0].name] for f in feeds_for(model, seed=2, batch=4, samples=4)])
    return path, feeds, images, None


def reduce(prepared, method: str, keep: float):
    """(plan, reduced model, mean cluster spread over the merged groups or None)."""
    spread = None
    if method == "prune":
        plan = build_plan(prepared, PruneOptions(target_macs=keep), count_cost(prepared.model))
    else:
        plan, details = method_plan(prepared, PruneOptions(method="centripetal", target_macs=keep, compensate=False),
                                    count_cost(prepared.model))
        spread = float(np.mean([s["spread"] for s in details["clusters"]]))
    return plan, ApplyPlanPass(prepared.analysis, plan)(prepared.model).model, spread


def measure(reference: np.ndarray, model: onnx.ModelProto, images: np.ndarray, labels) -> dict:
    out = predict(model, images)
    error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    agreement = float(np.mean(out.argmax(1) == reference.argmax(1)))
    accuracy = None if labels is None else float(np.mean(out.argmax(1) == labels))
    return {"error": error, "agreement": agreement, "accuracy": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="trained Fashion-MNIST nets when present, else zoo models")
    parser.add_argument("--keep", default="0.7,0.5", help="fractions of MACs to keep")
    parser.add_argument("--calib", type=int, default=384, help="calibration images (Fashion-MNIST)")
    parser.add_argument("--feed-batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=4096, help="sampled output positions per layer")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--trained-dir", default=str(TRAINED), help="where the Fashion-MNIST .onnx files are")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "centripetal_repair.md"))
    args = parser.parse_args(argv)
    trained = sorted(p.stem for p in Path(args.trained_dir).glob("*.onnx"))
    models = args.models.split(",") if args.models else (trained or list(ZOO_DEFAULT))
    keeps = [float(k) for k in args.keep.split(",")]
    load_at_start = os.getloadavg()[0]
    rows = []
    for name in models:
        path, feeds, images, labels = load(name, args.calib, args.feed_batch, Path(args.trained_dir))
        prepared = prepare_folded(path)
        reference = predict(prepared.model, images)
        base_macs = count_cost(prepared.model).macs
        base = measure(reference, prepared.model, images, labels)
        rows.append((name, "-", "original", 1.0, base, 0.0, "", None))
        for keep in keeps:
            for method in ("prune", "centripetal"):
                start = time.perf_counter()
                plan, reduced, spread = reduce(prepared, method, keep)
                seconds = time.perf_counter() - start
                macs = count_cost(reduced).macs / base_macs
                rows.append((name, keep, method, macs, measure(reference, reduced, images, labels), seconds, "",
                             spread))
                start = time.perf_counter()
                repaired, report = repair(prepared.model, reduced, feeds, prepared.analysis, plan,
                                          ridge=args.ridge, rows=args.rows)
                seconds += time.perf_counter() - start
                applied = sum(layer["applied"] for layer in report["layers"])
                rows.append((name, keep, f"{method} + repair", macs, measure(reference, repaired, images, labels),
                             seconds, f"{applied}/{len(report['layers'])}", spread))
                print(f"{name} keep {keep} {method}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
    data = "Fashion-MNIST" if any(name in trained for name in models) else "generated inputs"
    lines = [
        "# Centripetal cluster-and-merge and least-squares repair at equal MACs",
        "",
        f"Command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}`",
        f"Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores (load average {load_at_start:.1f} at the "
        f"start), Python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}.",
        f"Data: {data}; {sum(len(next(iter(f.values()))) for f in feeds)} calibration samples in {len(feeds)} "
        f"feeds, evaluation on {len(images)} other samples.  BatchNorm folded first; `prune` = l2, domino-o, "
        "uniform allocation; `centripetal` = k-means centroids with the same kept counts (cluster spread: mean "
        "distance of a filter to its centroid / mean filter norm, averaged over groups); repair: ridge "
        f"{args.ridge}, {args.rows} sampled positions per layer, every 4th feed held out.  Time: building the plan "
        "(+ the repair).",
        "",
        "| model | MACs target | method | MACs kept | accuracy | rel. error | top-1 agreement | cluster spread | "
        "time (s) | layers refitted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, keep, method, macs, m, seconds, applied, spread in rows:
        accuracy = "-" if m["accuracy"] is None else f"{m['accuracy']:.2%}"
        target = keep if keep == "-" else f"{keep:.0%}"
        spread = "" if spread is None else f"{spread:.3f}"
        lines.append(f"| {name} | {target} | {method} | {macs:.1%} | {accuracy} | {m['error']:.3f} | "
                     f"{m['agreement']:.2%} | {spread} | {seconds:.1f} | {applied} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
