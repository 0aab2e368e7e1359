"""RED's cost: hashing + merging of ResNet-50 against a plain L2 prune of the same model.

    python benchmarks/red_speed.py [--model resnet50_torchscript] [--repeat 3]

Each step is timed end to end from the file on disk (load, analyse, rewrite; median of --repeat runs):
hashing alone (BN fold + KDE hashing), RED hash + merge (what `red(..., separate_depthwise=False)` does),
RED with the uneven depthwise check, RED to 50 % of the MACs (merge tolerance search), and
`onnx_prune.prune(path, criterion="l2")` at the default ratio and at 50 % of the MACs.  Writes ``benchmarks/results/red_speed.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import onnx_prune
from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass
from onnx_prune.passes.hashing import DEFAULT_BANDWIDTH, HashWeightsPass
from onnx_prune.pipeline import prepare
from onnx_prune.red import red

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results" / "red_speed.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50_torchscript")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = str(ROOT / "models" / "zoo" / f"{args.model}.onnx")
    load_before = os.getloadavg()[0]
    steps = {
        "hashing alone (load, BN fold, hash)": lambda: HashWeightsPass(DEFAULT_BANDWIDTH)(
            FoldBatchNormPass()(prepare(path).model).model),
        "RED hash + merge": lambda: red(path, separate_depthwise=False),
        "RED hash + merge + depthwise check": lambda: red(path),
        "RED to 50 % of MACs (tolerance search, merge, prune)": lambda: red(path, target_macs=0.5),
        "L2 prune, ratio 0.3 (default)": lambda: onnx_prune.prune(path, criterion="l2"),
        "L2 prune, 50 % of MACs": lambda: onnx_prune.prune(path, criterion="l2", target_macs=0.5),
    }
    seconds = {}
    for name, step in steps.items():
        seconds[name], result = median_time(step, args.repeat)
        print(f"{name}: {seconds[name]:.2f} s", file=sys.stderr, flush=True)
        if name == "RED hash + merge":
            report = result[1]
    baseline = seconds["L2 prune, ratio 0.3 (default)"]
    lines = [f"# RED speed on {args.model} ({os.cpu_count()} CPUs, load average {load_before:.1f} at start, "
             f"median of {args.repeat})", "",
             f"Bandwidth {DEFAULT_BANDWIDTH}: {report.details['HashWeightsPass']['distinct_before']} distinct weight values before, "
             f"{report.details['HashWeightsPass']['distinct_after']} after; {report.details['merge']['merged']} channels merged.", "",
             "| step | seconds | / L2 prune (ratio 0.3) |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {s / baseline:.2f}x |" for name, s in seconds.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
