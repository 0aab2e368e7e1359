"""Accuracy (or agreement with the unpruned model) against MAC reduction, for every available method.

    python benchmarks/method_sweep.py [--models fmnist_resnet20,...,mobilenet_v2_imagenet] [--keep 0.9,0.7,0.5,0.3]
                                      [--only LABEL,...] [--latency] [--out benchmarks/results/sweep]

Methods come from `onnx_prune.pipeline.sweep_configurations()`: whatever the library offers is swept, so
new methods appear without touching this script.  Models:
- the Fashion-MNIST nets in `models/trained/` (accuracy on the committed evaluation subset, or on the full
  10k test set with `--full-test` when the data set is installed; calibration data = a disjoint slice of
  the subset for the methods that take it);
- `mobilenet_v2_imagenet` (pretrained; top-1 on the 20 labelled images, top-1/top-5 agreement and KL
  divergence against the unpruned model on the augmented crops);
- any zoo model name (random weights: agreement only).
Writes `<out>.json`, `<out>.md` and one plot per model, `docs/<out name>_<model>.png`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnx_prune
from onnx_prune.errors import PruneError
from onnx_prune.pipeline import prepare, sweep_configurations

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "models" / "trained"), str(ROOT / "models" / "pretrained"), str(ROOT / "tests")]
CALIBRATION_SAMPLES = 256


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _predict(model: onnx.ModelProto | str, images: np.ndarray, batch: int = 256) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def load_dataset(name: str, full_test: bool):
    """(model path, evaluation images, labels or None, calibration images)."""
    if name.startswith("fmnist_"):
        import fashion_mnist

        images, labels = fashion_mnist.load_eval()
        calibration, images, labels = images[:CALIBRATION_SAMPLES], images[CALIBRATION_SAMPLES:], \
            labels[CALIBRATION_SAMPLES:]
        if full_test:
            raw, labels = fashion_mnist.load_split("test")
            images = fashion_mnist.normalize(raw)
        return ROOT / "models" / "trained" / f"{name.removeprefix('fmnist_')}.onnx", images, labels, calibration
    if name == "mobilenet_v2_imagenet":
        import imagenet_eval

        images, labels = imagenet_eval.load_imagenet_eval()
        path = ROOT / "models" / "zoo" / "mobilenet_v2_imagenet.onnx"
        if not path.exists():
            sys.exit(f"{path} missing: build it with  python models/pretrained/build_mobilenet_v2.py")
        return path, images[:-64], labels[:-64], images[-64:]  # the last 64 crops calibrate, the rest evaluate
    from conftest import zoo_model
    from invariants import feeds_for

    path = zoo_model(*name.rsplit("_", 1))
    model = onnx.load(str(path), load_external_data=False)
    images = np.concatenate([f[model.graph.input[0].name] for f in feeds_for(model, seed=1, batch=8, samples=4)])
    return path, images, None, images[:8]


def metrics(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> dict:
    out = {"top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean())}
    top5 = np.argsort(-logits, axis=1)[:, :5]
    out["top5_agreement"] = float(np.mean([r in t for r, t in zip(reference.argmax(1), top5)]))
    p, q = _softmax(reference.astype(np.float64)), _softmax(logits.astype(np.float64))
    out["kl"] = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
    if labels is not None:
        labelled = labels >= 0
        if labelled.any():
            out["accuracy"] = float((logits[labelled].argmax(1) == labels[labelled]).mean())
    return out


def _latency_ms(model: onnx.ModelProto | str, image: np.ndarray) -> float:
    from onnx_prune.runtime.bench import benchmark

    return benchmark(model, batches=(1,), warmup=5, repeat=30, threads=1)[0].median_ms


def sweep_model(name: str, keep: list[float], only: set[str] | None, latency: bool, full_test: bool) -> dict:
    path, images, labels, calibration = load_dataset(name, full_test)
    prepared = prepare(str(path))
    reference = _predict(prepared.model, images)
    # ImageNet has 20 labelled images among 320: agreement with the unpruned model says more than accuracy
    primary = "top1_agreement" if name == "mobilenet_v2_imagenet" or labels is None else "accuracy"
    result = {"model": name, "samples": int(len(images)), "primary": primary,
              "unpruned": metrics(reference, reference, labels), "runs": []}
    base_latency = _latency_ms(prepared.model, images[:1]) if latency else None
    with tempfile.TemporaryDirectory() as tmp:
        calib_path = Path(tmp) / "calib.npz"
        per_batch = max(1, min(32, len(calibration) // 4))  # a few feeds: repair holds one out
        stacked = calibration[:len(calibration) // per_batch * per_batch]
        np.savez(calib_path, **{prepared.model.graph.input[0].name:
                                stacked.reshape(-1, per_batch, *calibration.shape[1:])})
        for config in sweep_configurations():
            if only and config.label not in only:
                continue
            for fraction in keep:
                options = dict(config.options, calib=str(calib_path)) if config.needs_calibration else config.options
                started = time.perf_counter()
                try:
                    pruned, report = onnx_prune.prune(prepared, target_macs=fraction, **options)
                except PruneError as err:
                    print(f"  {config.label} @ {fraction}: {err}", file=sys.stderr)
                    continue
                seconds = time.perf_counter() - started
                row = {"method": config.label, "keep_macs": fraction,
                       "mac_reduction": report.macs_before / max(report.macs_after, 1), "seconds": seconds,
                       **metrics(reference, _predict(pruned, images), labels)}
                if latency:
                    row["speedup"] = base_latency / _latency_ms(pruned, images[:1])
                result["runs"].append(row)
                shown = row[primary]
                print(f"  {name} {config.label:32s} keep {fraction:.2f}: {shown:.4f} ({seconds:.1f} s)",
                      file=sys.stderr, flush=True)
    return result


def markdown(result: dict) -> str:
    metric = result["primary"]
    fractions = sorted({r["keep_macs"] for r in result["runs"]}, reverse=True)
    lines = [f"**{result['model']}** — {metric} on {result['samples']} samples "
             f"(unpruned: {result['unpruned'][metric]:.4f}); columns: share of MACs kept",
             "", "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    by_method: dict[str, dict[float, dict]] = {}
    for run in result["runs"]:
        by_method.setdefault(run["method"], {})[run["keep_macs"]] = run
    best = {f: max((r[metric] for r in result["runs"] if r["keep_macs"] == f), default=None) for f in fractions}
    for method, runs in by_method.items():
        cells = []
        for f in fractions:
            value = runs.get(f, {}).get(metric)
            cells.append("" if value is None else (f"**{value:.4f}**" if value == best[f] else f"{value:.4f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if any("speedup" in r for r in result["runs"]):
        speed = {f: np.median([r["speedup"] for r in result["runs"] if r["keep_macs"] == f]) for f in fractions}
        lines.append("| CPU speed-up (batch 1, median) | " + " | ".join(f"{speed[f]:.2f}x" for f in fractions) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["primary"]
    fig, ax = plt.subplots(figsize=(8, 5))
    by_method: dict[str, list] = {}
    for run in result["runs"]:
        by_method.setdefault(run["method"], []).append((1 - 1 / run["mac_reduction"], run[metric]))
    for method, points in sorted(by_method.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method, linewidth=1)
    ax.axhline(result["unpruned"][metric], color="black", linestyle="--", linewidth=0.8, label="unpruned")
    ax.set_xlabel("MAC reduction (share of MACs removed)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(result["model"])
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist_resnet20,fmnist_mobilenet_v2,fmnist_densenet,fmnist_se_net")
    parser.add_argument("--keep", default="0.9,0.7,0.5,0.3", help="shares of MACs kept")
    parser.add_argument("--only", help="comma-separated method labels (default: all)")
    parser.add_argument("--latency", action="store_true", help="also time each pruned model (slow)")
    parser.add_argument("--full-test", action="store_true", help="Fashion-MNIST: the full 10k test set")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep"))
    args = parser.parse_args(argv)
    keep = [float(k) for k in args.keep.split(",")]
    only = set(args.only.split(",")) if args.only else None
    started = time.perf_counter()
    results = [sweep_model(m, keep, only, args.latency, args.full_test) for m in args.models.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}, onnxruntime {ort.__version__}"
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "machine": machine, "seconds": time.perf_counter() - started,
         "results": results}, indent=1))
    text = "\n\n".join(markdown(r) for r in results)
    out.with_suffix(".md").write_text(text + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    for r in results:
        plot(r, ROOT / "docs" / f"{out.name}_{r['model']}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
