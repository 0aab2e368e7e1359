"""MAC reduction against fidelity: RED against L1 / L2 pruning at the same MACs.

    python benchmarks/red_table.py [--merge-tols 0,0.4,0.5,0.6,0.7] [--targets 0.9,0.75,0.5]
                                   [--trained-dir models/trained] [--models resnet20,...]

Models: the trained Fashion-MNIST nets (accuracy on the 2,000 evaluation images) when present, else zoo
models (random weights: relative error and top-1 agreement against the original on random inputs).
Rows per model: RED alone (hash + merge + uneven depthwise separation, no target) at each merge tolerance,
each followed by `onnx_prune.prune(path, target_macs=F, criterion="l1"|"l2")` at the MACs F that RED reached;
then per MAC target, L1 and L2 against `red(path, target_macs=F)`: the default (merge tolerance raised until
merging reaches F, L2 prune of what it cannot), and exact merging only, then L2 prune, with and without
hashing.  A second table lists every conv
the uneven depthwise separation would make cheaper in MACs, with the latencies measured for it.
Writes ``benchmarks/results/red_table.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from red_models import TRAINED, score, subjects

import onnx_prune
from onnx_prune.passes.hashing import DEFAULT_BANDWIDTH
from onnx_prune.red import red
from onnx_prune.runtime.cost import count_cost

RESULTS = Path(__file__).resolve().parent / "results" / "red_table.md"


def row(subject, method: str, model, before, merged="-", pruned="-", separated="-") -> str:
    after = count_cost(model)
    result = score(subject, model)
    accuracy = f"{result['accuracy']:.2%}" if "accuracy" in result else "-"
    return (f"| {subject.name} | {method} | {after.macs / before.macs:.1%} | {after.params / before.params:.1%} | "
            f"{merged} | {pruned} | {separated} | {accuracy} | {result['top1_agreement']:.2%} | "
            f"{result['rel_error']:.4f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge-tols", default="0,0.4,0.5,0.6,0.7")
    parser.add_argument("--targets", default="0.9,0.75,0.5")
    parser.add_argument("--trained-dir", type=Path, default=TRAINED)
    parser.add_argument("--models", default=None, help="comma-separated subset (trained net names)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    tols = [float(t) for t in args.merge_tols.split(",")]
    models = subjects(args.trained_dir, only=args.models.split(",") if args.models else None)
    lines = [f"# RED against L1/L2 pruning at equal MACs ({models[0].kind} models, bandwidth {DEFAULT_BANDWIDTH})",
             "", "| model | method | MACs kept | params kept | merged | pruned | separated | accuracy "
             "| top-1 agreement | rel. error |", "|---|---|---|---|---|---|---|---|---|---|"]
    if models[0].labels is not None:
        lines[0] += "; original accuracy: " + ", ".join(
            f"{s.name} {float((s.reference.argmax(1) == s.labels).mean()):.2%}" for s in models)
    separations = []

    def add_red(subject, before, label, **options) -> float:
        model, report = red(subject.path, **options)
        decisions = report.details.get("SeparateDepthwisePass", {}).get("decisions", [])
        separated = sum(d["applied"] for d in decisions)
        separations.extend((subject.name, label, d) for d in decisions
                           if d["macs_after"] < d["macs_before"])
        merged = f"{report.details['merge']['merged']} (tol {report.details['merge']['tol']:.2f})"
        lines.append(row(subject, label, model, before, merged,
                         report.details.get("pruned", 0), separated))
        print(lines[-1], flush=True)
        return report.macs_after / report.macs_before

    def add_prune(subject, before, target, label):
        for criterion in ("l1", "l2"):
            model, report = onnx_prune.prune(subject.path, target_macs=target, criterion=criterion)
            lines.append(row(subject, f"{criterion.upper()} {label}", model, before,
                             pruned=report.channels_before - report.channels_after))
            print(lines[-1], flush=True)

    for subject in models:
        before = count_cost(onnx_prune.prepare(subject.path).model)
        for tol in tols:
            reached = add_red(subject, before, f"RED, tol {tol:g}", merge_tol=tol)
            if reached < 0.99:
                add_prune(subject, before, reached, f"@ {reached:.1%} (= RED tol {tol:g})")
        for target in targets:
            add_prune(subject, before, target, f"@ {target:.0%}")
            add_red(subject, before, f"RED no hash, exact merge + L2 @ {target:.0%}", target_macs=target,
                    hash_weights=False, merge_to_target=False)
            add_red(subject, before, f"RED exact merge + L2 @ {target:.0%}", target_macs=target,
                    merge_to_target=False)
            add_red(subject, before, f"**RED (default) @ {target:.0%}**", target_macs=target)
    lines += ["", "## Uneven depthwise separation: convs with fewer MACs once separated", ""]
    if separations:
        lines += ["| model | run | conv | in | out | k² | distinct kernels | MACs before | after | latency before ms "
                  "| after ms | applied |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, label, d in separations:
            latency = [f"{v:.3f}" if v is not None else "-" for v in (d["latency_before_ms"], d["latency_after_ms"])]
            lines.append(f"| {name} | {label} | {d['node']} | {d['n_in']} | {d['n_out']} | {d['kernel']} | "
                         f"{d['distinct']} | {d['macs_before']} | {d['macs_after']} | {latency[0]} | {latency[1]} | "
                         f"{'yes' if d['applied'] else 'no: ' + d['reason']} |")
    else:
        lines.append("None: no k x k conv of these models has few enough distinct kernels per input channel "
                     "after hashing (sum(u_c) (k² + n_out) < n_in n_out k² never holds).")
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[-3:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
