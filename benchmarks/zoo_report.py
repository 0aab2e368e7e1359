"""What the analysis finds on every zoo model: groups, prunable share of Conv MACs, and a 0.3 prune.

    python benchmarks/zoo_report.py [--ratio 0.3] [--out benchmarks/results/zoo.md]

Builds missing zoo models first (needs the dev extra).  The table goes into the README.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx_prune
from onnx_prune.pipeline import prepare, summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    from build_zoo import EXPORTERS, MODELS
    from conftest import zoo_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo.md"))
    args = parser.parse_args(argv)
    rows = ["| model | exporter | groups | prunable groups | prunable Conv MACs | MACs kept at "
            f"{args.ratio} | params kept at {args.ratio} |", "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for exporter in EXPORTERS:
            print(f"{name} {exporter} ...", file=sys.stderr)
            prepared = prepare(zoo_model(name, exporter))
            analysis = summarize(prepared)
            _, report = onnx_prune.prune(prepared, ratio=args.ratio)
            prunable = sum(1 for g in analysis.groups if g.size - g.frozen > 0 and g.size > 1)
            rows.append(f"| {name} | {exporter} | {len(analysis.groups)} | {prunable} | "
                        f"{100 * analysis.prunable_mac_share:.1f}% | "
                        f"{100 * report.macs_after / report.macs_before:.1f}% | "
                        f"{100 * report.params_after / report.params_before:.1f}% |")
    table = "\n".join(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
