"""Fidelity against KDE bandwidth for RED's adaptive hashing, and the default bandwidth it justifies.

    python benchmarks/red_bandwidth.py [--bandwidths 0.002,0.005,...] [--trained-dir models/trained]

Every model is BatchNorm-folded and hashed (per layer, and per neuron) at each bandwidth; printed: distinct
weight values kept (all hashed layers together), relative error of the logits and top-1 agreement with the
original, and accuracy where the models are the trained Fashion-MNIST nets.  The default is the largest
bandwidth whose per-layer hashing keeps top-1 agreement >= AGREEMENT on every trained model (on zoo models,
whose random weights make any rule arbitrary, relative error <= ZOO_REL_ERROR).  Writes
``benchmarks/results/red_bandwidth.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from red_models import TRAINED, score, subjects

from onnx_prune.passes.fold_batchnorm import FoldBatchNormPass
from onnx_prune.passes.hashing import DEFAULT_BANDWIDTH, HashWeightsPass
from onnx_prune.pipeline import prepare

AGREEMENT = 0.99
ZOO_REL_ERROR = 0.05
RESULTS = Path(__file__).resolve().parent / "results" / "red_bandwidth.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default="0.002,0.005,0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--trained-dir", type=Path, default=TRAINED)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    models = subjects(args.trained_dir)
    trained = models[0].labels is not None
    lines = [f"# RED hashing: fidelity against bandwidth ({models[0].kind} models)", "",
             "| model | per | bandwidth | distinct values (after / before) | rel. error | top-1 agreement "
             "| accuracy (original) | hashing s |", "|---|---|---|---|---|---|---|---|"]
    ok = {bw: True for bw in bandwidths}
    for subject in models:
        folded = FoldBatchNormPass()(prepare(subject.path).model).model
        for per_neuron in (False, True):
            for bw in bandwidths:
                start = time.perf_counter()
                hashing = HashWeightsPass(bw, per_neuron)(folded)
                hashed, details = hashing.model, hashing.details
                seconds = time.perf_counter() - start
                result = score(subject, hashed)
                accuracy = (f"{result['accuracy']:.2%} ({result['accuracy_original']:.2%})"
                            if "accuracy" in result else "-")
                lines.append(f"| {subject.name} | {'neuron' if per_neuron else 'layer'} | {bw:g} | "
                             f"{details['distinct_after']} / {details['distinct_before']} | "
                             f"{result['rel_error']:.4f} | {result['top1_agreement']:.2%} | {accuracy} | "
                             f"{seconds:.2f} |")
                print(lines[-1], flush=True)
                if not per_neuron:
                    ok[bw] &= (result["top1_agreement"] >= AGREEMENT if trained
                               else result["rel_error"] <= ZOO_REL_ERROR)
    passing = [bw for bw in bandwidths if ok[bw]]
    rule = (f"top-1 agreement >= {AGREEMENT:.0%} on every model" if trained
            else f"relative error <= {ZOO_REL_ERROR} on every model")
    chosen = max(passing) if passing else None
    lines += ["", f"Rule: the largest per-layer bandwidth with {rule}: "
              f"**{chosen if chosen is not None else 'none of those tried'}** "
              f"(library default `DEFAULT_BANDWIDTH` = {DEFAULT_BANDWIDTH})."]
    print(lines[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
