#!/usr/bin/env bash
# The README's per-layer plot: resnet20 (Fashion-MNIST) at 90% and 70% of MACs with RED, centripetal and L2
# (Domino-o), accuracy on the 1,744 committed evaluation images not used elsewhere, drawn by `onnx-prune report`.
# Usage: benchmarks/report_plot.sh [OUT.png]   (default docs/report_resnet20.png; needs the 'plot' extra)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/report_resnet20.png}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
reports=()
for config in "red 0.9" "red 0.7" "centripetal 0.9" "centripetal 0.7" "prune 0.9" "prune 0.7"; do
  set -- $config
  onnx-prune models/trained/resnet20.onnx "$work/$1_$2.onnx" --method "$1" --target-macs "$2" \
      --inputs "models/trained/fmnist_eval.npz[256:]" --mean 0.2860 --std 0.3530 \
      --report "$work/$1_$2.json" --quiet
  reports+=("$work/$1_$2.json")
done
onnx-prune report "${reports[@]}" --plot "$out"
