"""Blended criteria against every single criterion of the pool, at the same MAC targets.

With the trained Fashion-MNIST models of ``models/trained`` (when their ONNX files are there): the first
``--calib`` images of ``fmnist_eval.npz`` are the calibration set (fitness of the search, activation criteria),
the rest, disjoint, measure the accuracy of every pruned model.  Without them: zoo models (random weights), the
fitness on generated inputs (seed ``--seed``), and the evaluation as top-1 agreement with the original on other
generated inputs (seed ``--seed + 1``).

Each single criterion is pruned through the ordinary pipeline (`build_plan`, same target, allocation and
options); the blend through `blend_search.blend_plan`.  The table also gives the Spearman rho of every pair of
criteria over all groups of the models: the evidence for the clustering cut.

    python benchmarks/blend_table.py [--models a,b] [--target-macs 0.5,0.8] [--generations 5] [--population 10]
        [--workers 2] [--calib 256] [--samples 8] [--time-budget S] [--seed 0] [--trained DIR]
        [--out benchmarks/results/blend.md]

Writes the Markdown (also printed on stdout); progress on stderr.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_prune.analysis.blend import DEFAULT_THRESHOLD, free_channel_matrix, rank_correlation
from onnx_prune.blend_search import blend_plan, generated_inputs, pool_scores
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import PruneOptions, build_plan, prepare
from onnx_prune.runtime.cost import count_cost
from onnx_prune.runtime.fidelity import compare

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "models" / "trained"
ZOO = REPO / "models" / "zoo"
ZOO_DEFAULT = ("squeezenet1_1", "mobilenet_v2")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "blend.md"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated: trained model names, or zoo names (torchscript exports)")
    p.add_argument("--target-macs", type=_floats, default=[0.5, 0.8],
                   help="fractions of MACs kept, comma-separated (0.5,0.8)")
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--calib", type=int, default=256, help="calibration images (trained models)")
    p.add_argument("--samples", type=int, default=8, help="generated inputs for fitness and evaluation (zoo)")
    p.add_argument("--time-budget", type=float, help="seconds per search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained", type=Path, default=TRAINED, help="folder of the trained models (models/trained)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def _predict(session: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]).argmax(1)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class TrainedData:
    """Calibration slice (fitness, activation criteria) and the disjoint evaluation slice of fmnist_eval.npz."""
    metric = "accuracy"

    def __init__(self, calib: int):
        sys.path.insert(0, str(TRAINED))
        import fashion_mnist  # noqa: E402 - numpy only

        x, labels = fashion_mnist.load_eval()
        self.calib_x, self.eval_x, self.eval_labels = x[:calib], x[calib:], labels[calib:]
        self.describe = (f"Fashion-MNIST `fmnist_eval.npz`: fitness on images 0-{calib - 1} (top-1 agreement with "
                         f"the original), accuracy on the {len(self.eval_x)} other images")

    def calib_feeds(self, model: onnx.ModelProto) -> list[dict]:
        return [{model.graph.input[0].name: self.calib_x}]

    def npz(self, model: onnx.ModelProto, folder: str) -> str:
        path = os.path.join(folder, "calib.npz")
        np.savez(path, **{model.graph.input[0].name: self.calib_x})
        return path

    def score(self, original: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
        return float(np.mean(_predict(_session(pruned), self.eval_x) == self.eval_labels))


class GeneratedData:
    """Fitness on generated inputs (inside the search), evaluation on other generated inputs."""
    metric = "agreement (eval)"

    def __init__(self, samples: int, seed: int):
        self.samples, self.seed = samples, seed
        self.describe = (f"generated inputs: fitness on seed {seed} ({samples} samples), evaluation = top-1 "
                         f"agreement with the original on {samples} other samples (seed {seed + 1})")

    def calib_feeds(self, model):
        return None

    def npz(self, model, folder):
        return None

    def score(self, original, pruned) -> float:
        feeds = generated_inputs(original, self.seed + 1, self.samples)
        return float(compare(original, pruned, feeds).outputs[0].top1_agreement)


def pair_correlations(prepared, pool, seed: int, calib_feeds) -> dict[tuple[str, str], list[float]]:
    """rho of every pair of criteria, one value per group with at least 3 free channels."""
    opts = PruneOptions(seed=seed)
    scores = pool_scores(prepared, [g.id for g in prepared.analysis.prunable_groups], pool, opts.aggregate,
                         opts.normalize, opts.seed, opts.landmarks, calib_feeds)
    pairs: dict[tuple[str, str], list[float]] = {pair: [] for pair in combinations(pool, 2)}
    for group in prepared.analysis.prunable_groups:
        if (~group.frozen).sum() >= 3:
            rho = rank_correlation(free_channel_matrix(scores, pool, group.id, group.frozen))
            for (i, a), (j, b) in combinations(enumerate(pool), 2):
                pairs[(a, b)].append(float(rho[i, j]))
    return pairs


def evaluate_target(prepared, name: str, data, args, target: float, calib_path: str | None) -> tuple[list[str], dict]:
    """Rows for one model at one MAC target: every single criterion through the pipeline, then the blend."""
    before = count_cost(prepared.model)
    print(f"{name} @ {target:.0%} MACs: searching the blend", file=sys.stderr, flush=True)
    plan, report = blend_plan(prepared, PruneOptions(target_macs=target, seed=args.seed),
                              calib_inputs=data.calib_feeds(prepared.model), generations=args.generations,
                              population=args.population, workers=args.workers, time_budget=args.time_budget,
                              fitness_samples=args.samples)
    rows = []

    def row(criterion, plan, fitness, note=""):
        pruned = ApplyPlanPass(prepared.analysis, plan)(prepared.model).model
        macs = count_cost(pruned).macs / before.macs
        agreement = "-" if fitness.get("top1_agreement") is None else f"{fitness['top1_agreement']:.2%}"
        score = data.score(prepared.model, pruned)
        rows.append(f"| {name} | {target:.0%} | {criterion} | {macs:.1%} | {fitness['loss']:.4f} | {agreement} | "
                    f"{score:.2%} | {note} |")
        return score

    singles = {}
    for criterion, fitness in report["singles"].items():
        opts = PruneOptions(target_macs=target, seed=args.seed, criterion=criterion, calib=calib_path)
        singles[criterion] = row(criterion, build_plan(prepared, opts, before), fitness)
    alpha = ", ".join(f"{c['criterion']} {c['alpha']:.2f}" for c in report["components"])
    search = report["search"]
    blend_score = row("**blend**", plan, report["fitness"],
                      f"α: {alpha}; {search['evaluations']} evaluations, {search['seconds']:.1f} s "
                      f"({search['generations_run']} generations, {search['stopped']})")
    best = max(singles, key=singles.get)
    summary = {"model": name, "target": target, "blend": blend_score, "best_single": singles[best],
               "best_name": best, "seconds": search["seconds"], "pool": tuple(report["pool"]),
               "clusters": " ".join("{" + " ".join(c) + "}" for c in report["clusters"]["model"]["clusters"])}
    return rows, summary


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    trained = sorted(args.trained.glob("*.onnx"))
    if trained:
        wanted = args.models.split(",") if args.models else [p.stem for p in trained]
        paths = [args.trained / f"{name}.onnx" for name in wanted]
        data = TrainedData(args.calib)
    else:
        wanted = args.models.split(",") if args.models else list(ZOO_DEFAULT)
        paths = [ZOO / f"{name}_torchscript.onnx" for name in wanted]
        data = GeneratedData(args.samples, args.seed)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"missing models: {', '.join(missing)}", file=sys.stderr)
        return 1
    command = " ".join(["python benchmarks/blend_table.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Blended criteria against single criteria", "",
             f"Targets: keep {', '.join(f'{t:.0%}' for t in args.target_macs)} of MACs, uniform allocation, "
             f"domino-o aggregation, no fine-tuning, seed {args.seed}. Search: differential evolution, "
             f"{args.generations} generations, population {args.population}, {args.workers} worker(s); clustering "
             f"cut 1 - rho <= {DEFAULT_THRESHOLD:g}.",
             f"Data: {data.describe}.",
             f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
             f"command: `{command}`.",
             "", "Fitness loss (lower is better) = 1 - top-1 agreement with the original on the fitness data, "
             "plus a tie-break by relative output error worth less than one prediction.", "",
             f"| model | MACs target | criterion | MACs kept | fitness loss | fitness agreement | {data.metric} | "
             "search |", "|---|---|---|---|---|---|---|---|"]
    summaries, pairs = [], {}
    for path in paths:
        prepared = prepare(path)
        original = data.score(prepared.model, prepared.model)
        lines.append(f"| {path.stem} | - | original | 100% | - | - | {original:.2%} | |")
        with tempfile.TemporaryDirectory() as folder:
            calib_path = data.npz(prepared.model, folder)
            for target in args.target_macs:
                rows, summary = evaluate_target(prepared, path.stem, data, args, target, calib_path)
                lines += rows
                summaries.append(summary)
        calib_feeds = data.calib_feeds(prepared.model)
        for pair, values in pair_correlations(prepared, summary["pool"], args.seed, calib_feeds).items():
            pairs.setdefault(pair, []).extend(values)
    lines += ["", f"| model | MACs target | model-level clusters | best single ({data.metric}) | blend | search s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['model']} | {s['target']:.0%} | {s['clusters']} | {s['best_name']} {s['best_single']:.2%} | "
              f"{s['blend']:.2%} | {s['seconds']:.1f} |" for s in summaries]
    lines += ["", "Spearman rho between criteria over every group with at least 3 free channels of these models "
              "(the clustering evidence):", "", "| pair | groups | median rho | 10th percentile | 90th percentile |",
              "|---|---|---|---|---|"]
    for (a, b), values in pairs.items():
        if values:
            q10, q50, q90 = np.percentile(values, [10, 50, 90])
            lines.append(f"| {a} / {b} | {len(values)} | {q50:.2f} | {q10:.2f} | {q90:.2f} |")
    lines += ["", f"Total run time: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
