"""Does bnvar choose better channels than l2 and random?  Raw versus BN-folded filters for every magnitude
criterion.  Pretrained ImageNet MobileNetV2 (or EfficientNet-Lite0) at a MAC target, no data.

    python benchmarks/bnvar_quality.py [--kinds fused,bn] [--keep 0.9] [--eval-crops 300] [--allocations uniform]
                                       [--out benchmarks/results/bnvar_quality.md]

For each export kind (``fused``: BatchNorm folded into the convs by the TorchScript export, so bnvar's
statistics are measured on synthetic 1/f-noise inputs; ``bn``: BatchNormalization nodes kept, statistics
data-free from them), each criterion scores every prunable group; the allocator reaches the MAC target
(uniform: the same share per group; global: one ranking divided by group means; ``global-raw`` for bnvar: one
ranking of the raw scores, which bnvar's units allow, see ``criteria.comparable_across_groups``); the Plan is
applied with and without expected-activation compensation (``passes.compensate``, the removed channels'
means folded into consumer biases).  Metric: top-1 agreement with the unpruned model on the labelled ImageNet
images and crops of the evaluation photos (``models/pretrained/photo_split``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_prune.analysis.criteria import Scoring, channel_scores, comparable_across_groups
from onnx_prune.passes.allocate import Allocator, CostModel
from onnx_prune.passes.compensate import compensate
from onnx_prune.passes.constraints import Target
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.cost import count_cost

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "models" / "pretrained")]
import photo_split  # noqa: E402

ZOO = ROOT / "models" / "zoo"
NORMALISATION = {"mobilenet_v2_imagenet": (photo_split.IMAGENET_MEAN, photo_split.IMAGENET_STD),  # as in
                 "efficientnet_lite0_imagenet": ((127 / 255,) * 3, (128 / 255,) * 3)}     # build_pretrained.py


def model_path(model: str, kind: str) -> Path:
    return ZOO / f"{model}{'_bn' if kind == 'bn' else ''}.onnx"
# (label, criterion, bn_mode): the magnitude criteria on BN-folded filters and on raw filters x |gamma|
CONFIGS = [("random", "random", "folded"), ("l1", "l1", "folded"), ("l2", "l2", "folded"),
           ("fpgm", "fpgm", "folded"), ("bn (|gamma|)", "bn", "folded"), ("l1 raw x |gamma|", "l1", "gamma"),
           ("l2 raw x |gamma|", "l2", "gamma"), ("fpgm raw x |gamma|", "fpgm", "gamma"), ("bnvar", "bnvar", "folded")]


class RawGlobalAllocator(Allocator):
    """Global order on the raw scores (no division by group means): for criteria comparable across groups."""

    def global_order(self):
        entries = []
        for gid, score in sorted(self.scores.items()):
            group = self.analysis.groups[gid]
            free = np.nonzero(~group.frozen)[0]
            ranked = free[np.lexsort((free, score[free]))][:group.size - self._floor(group)]
            entries += [(float(score[c]), gid, int(c)) for c in ranked]
        entries.sort()
        return [(gid, c) for _, gid, c in entries]


def predict(model, x: np.ndarray, batch: int = 50) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def evaluation_inputs(crops: int, model: str) -> np.ndarray:
    labelled, _ = photo_split.labelled_images()
    images, _ = photo_split.crops("eval", crops)
    mean, std = NORMALISATION[model]
    return photo_split.normalize(np.concatenate([labelled, images]), mean, std)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_imagenet", choices=sorted(NORMALISATION))
    parser.add_argument("--kinds", default="fused,bn")
    parser.add_argument("--keep", default="0.9")
    parser.add_argument("--eval-crops", type=int, default=300)
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--only", default="", help="comma-separated config labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bnvar_quality.md")
    args = parser.parse_args(argv)
    x = evaluation_inputs(args.eval_crops, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    lines = [f"# bnvar against l2 and random, raw vs folded filters: {args.model}, no data",
             "", f"Top-1 agreement with the unpruned model on {len(x)} inputs (labelled ImageNet images + crops of the "
             "evaluation photos).", "",
             "| export | keep MACs | criterion | allocation | MACs kept | agreement, zero fill | "
             "agreement, compensated |", "|---|---|---|---|---|---|---|"]
    for kind in args.kinds.split(","):
        prepared = prepare(str(model_path(args.model, kind)))
        reference = predict(prepared.model, x).argmax(1)
        cost = count_cost(prepared.model)
        cost_model = CostModel.of(prepared.model, prepared.analysis, {n: c.macs for n, c in cost.per_node.items()})
        ids = [g.id for g in prepared.analysis.prunable_groups]
        started = time.perf_counter()
        scorings = {mode: Scoring.for_prepared(prepared, bn_mode=mode) for mode in ("folded", "gamma")}
        stats = scorings["folded"].statistics = scorings["gamma"].statistics = scorings["folded"].statistics()
        print(f"{kind}: statistics of {len(stats)} groups in {time.perf_counter() - started:.1f} s "
              f"(sources: {sorted({s.source for s in stats.values()})})", file=sys.stderr, flush=True)
        for label, criterion, bn_mode in CONFIGS:
            if (only and label not in only) or (kind == "fused" and bn_mode == "gamma") \
                    or (kind == "fused" and criterion == "bn"):
                continue  # no BatchNorm in the fused export: gamma modes equal folded, bn falls back to l2
            scores = {gid: channel_scores(prepared.analysis.groups[gid], scorings[bn_mode], criterion)
                      for gid in ids}
            allocations = args.allocations.split(",")
            if comparable_across_groups(criterion) and "global" in allocations:
                allocations.append("global-raw")
            for keep in [float(k) for k in args.keep.split(",")]:
                for allocation in allocations:
                    cls = RawGlobalAllocator if allocation == "global-raw" else Allocator
                    allocator = cls(prepared.analysis, scores, cost_model)
                    plan = allocator.allocate(Target(macs=keep), allocation.replace("-raw", ""))
                    row = []
                    for plan_used in (plan, compensate(prepared, plan, stats)):
                        pruned = ApplyPlanPass(prepared.analysis, plan_used)(prepared.model).model
                        row.append(float((predict(pruned, x).argmax(1) == reference).mean()))
                    kept = count_cost(pruned).macs / cost.macs
                    lines.append(f"| {kind} | {keep:.2f} | {label} | {allocation} | {kept:.3f} | {row[0]:.3f} | "
                                 f"{row[1]:.3f} |")
                    print(lines[-1], flush=True)
                    args.out.write_text("\n".join(lines) + "\n")  # row by row: a long run keeps what it did
    return 0


if __name__ == "__main__":
    sys.exit(main())
