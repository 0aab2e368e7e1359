"""Variants of the calibrated default path on a pretrained model, measured like `pretrained_quality.py`:

    python benchmarks/calibrated_variants.py recalibration [--model mobilenet_v2_imagenet] [--kind fused] [--keep 0.9]
    python benchmarks/calibrated_variants.py schedule      [--model mobilenet_v2_imagenet] [--kind fused] [--keep 0.8]

- ``recalibration``: the default pruning (no data for the plan, uniform allocation), then `RecalibratePass` on
  256 calibration crops correcting the mean only or the mean and spread of every layer's output channels:
  top-1 agreement and the held-out damage before/after each.
- ``schedule``: the default calibrated path (`prune(..., calib=...)`) in 1, 2 and 3 steps (`--steps`: evenly
  spaced shares of the original, each step pruning the previous result).

Evaluation: the crops of the evaluation photos (`pretrained_quality.Data`); calibration: 256 crops of the other
photos.  Prints one line per variant.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "models" / "pretrained"), str(ROOT / "models" / "trained")]
import pretrained_quality as pq  # noqa: E402

import onnx_prune  # noqa: E402
from onnx_prune.passes.recalibrate import RecalibratePass, channel_map  # noqa: E402
from onnx_prune.pipeline import _options, build_recipe, finish_recipe, prepare  # noqa: E402
from onnx_prune.runtime.cost import count_cost  # noqa: E402

CALIBRATION_CROPS = 256


def agreement(reference, model, data) -> float:
    return pq.measure(reference, pq.predict(model, data.x), data.labels)["top1_agreement"]


def recalibration(prepared, data, reference, keep: float, calibration) -> None:
    name = prepared.model.graph.input[0].name
    feeds = [{name: calibration[i:i + 32]} for i in range(0, len(calibration), 32)]
    recipe = build_recipe(prepared, _options(None, dict(target_macs=keep, progress=False)))
    pruned, _ = finish_recipe(recipe)
    mapping = channel_map(recipe.prepared.model, recipe.prepared.analysis, recipe.plan)
    print(f"pruned to {keep:.0%} of MACs, no recalibration: agreement {agreement(reference, pruned, data):.3f}")
    for spread in (False, True):
        result = RecalibratePass(recipe.prepared.model, mapping, feeds, spread=spread)(pruned)
        d = result.details
        print(f"recalibrated ({'mean and spread' if spread else 'mean only'}): agreement "
              f"{agreement(reference, result.model, data):.3f}; held-out damage {d['held_out_damage_before']:.3f}"
              f" -> {d['held_out_damage_after']:.3f} ({'kept' if result.modified else 'refused'})", flush=True)


def schedule(prepared, data, reference, keep: float, calibration) -> None:
    name = prepared.model.graph.input[0].name
    calib = pq.write_calibration(calibration, name, Path(tempfile.mkdtemp()) / "calib.npz")
    base = count_cost(prepared.model).macs
    for steps in (1, 2, 3):
        started = time.perf_counter()
        pruned, _ = onnx_prune.prune(prepared, target_macs=keep, steps=steps, calib=str(calib), progress=False)
        print(f"schedule, {steps} step(s) to {keep:.0%}: MACs kept {count_cost(pruned).macs / base:.3f}, "
              f"agreement {agreement(reference, pruned, data):.3f} ({time.perf_counter() - started:.0f} s)",
              flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["recalibration", "schedule"])
    parser.add_argument("--model", default="mobilenet_v2_imagenet", choices=pq.IMAGENET)
    parser.add_argument("--kind", default="fused", choices=pq.KINDS)
    parser.add_argument("--keep", type=float, default=None, help="share of MACs kept (0.9 / 0.8 by experiment)")
    parser.add_argument("--eval-crops", type=int, default=200)
    args = parser.parse_args(argv)
    keep = args.keep or (0.9 if args.experiment == "recalibration" else 0.8)
    data = pq.Data(args.model, args.eval_crops)
    prepared = prepare(str(pq.model_path(args.model, args.kind)))
    reference = pq.predict(prepared.model, data.x)
    run = recalibration if args.experiment == "recalibration" else schedule
    run(prepared, data, reference, keep, data.calibration(CALIBRATION_CROPS, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
