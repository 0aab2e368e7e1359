"""Per-group damage of merging against pruning on the pretrained ImageNet models (issue 15, item 3).

    python benchmarks/merge_quality.py --model mobilenet_v2_imagenet --kind fused --keep 0.75 --eval-crops 100

Each prunable group alone (the rest of the model untouched) is reduced to ``--keep`` of its channels in
three ways, on the model the merging methods analyse (BatchNorm folded), every plan compensated by
`pipeline.compensated` as `prune` would:

- ``bnvar``: the default pruning selection (bnvar, domino-o), removed channels replaced by their mean;
- ``centripetal``: `CentripetalSelect` (k-means on producer and carrier rows, clusters merged; a linear stream
  pruned by bnvar);
- ``centres only``: the centripetal plan's kept channels with the other channels pruned, not merged (does the
  merge add anything to the selection?).

``--targets 0.9,0.8`` instead prunes the whole model with `onnx_prune.prune` at those shares of MACs, once per
``--configs`` entry (``label=key:value;key:value``, values parsed as JSON where they parse; default: the
merging methods and pruning at the same allocation), and prints agreement / KL / MACs reached per run.  With
``--fixed-plan`` each config's plan is built once and compensated without and with variance restoration
(``--restore-variance``), the allocation held fixed.  Config keys ``restore_cap``, ``restore_sources`` and
``restore_merges`` set `passes.compensate`'s restoration constants for a run (measurement only).  The
Fashion-MNIST nets (``fmnist_<net>``) run with ``--targets`` only.

Prints, per group, its size, carriers, whether its consumers read a linear stream, and top-1 agreement / KL
(of the pruned model's softmax from the original's, mean over the inputs) on the labelled images and
``--eval-crops`` evaluation crops (`benchmarks/pretrained_quality.py`'s evaluation side; no calibration data is
used).  ``--out`` writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "models" / "pretrained")]
import photo_split  # noqa: E402
import pretrained_models  # noqa: E402

from onnx_prune.analysis.criteria import channel_scores  # noqa: E402
from onnx_prune.methods import MethodInput  # noqa: E402
from onnx_prune.options import PruneOptions  # noqa: E402
from onnx_prune.passes.allocate import select_top  # noqa: E402
from onnx_prune.passes.centripetal import CentripetalSelect  # noqa: E402
from onnx_prune.passes.plan import GroupPlan, Plan  # noqa: E402
from onnx_prune.passes.rewrite import ApplyPlanPass  # noqa: E402
from onnx_prune.pipeline import compensated, constraints_of, prepare_folded  # noqa: E402


FMNIST = ("fmnist_resnet20", "fmnist_mobilenet_v2", "fmnist_densenet", "fmnist_se_net")  # end-to-end only


def evaluation_inputs(model: str, crops: int) -> np.ndarray:
    if model.startswith("fmnist_"):
        return evaluation_data(model, crops)[0]
    mean, std = pretrained_models.INPUT_NORMALISATION[model]
    labelled, _ = photo_split.labelled_images()
    eval_crops, _ = photo_split.crops("eval", crops)
    return photo_split.normalize(np.concatenate([labelled, eval_crops]), mean, std)


def evaluation_data(model: str, crops: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels; -1 where unlabelled) as `benchmarks/pretrained_quality.py` evaluates `model`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pretrained_quality

    data = pretrained_quality.Data(model, crops)
    return data.x, data.labels


def model_file(model: str, kind: str) -> Path:
    if model.startswith("fmnist_"):
        return ROOT / "models" / "trained" / f"{model.removeprefix('fmnist_')}.onnx"
    return pretrained_models.model_path(model, kind)


def logits(model, x: np.ndarray, batch: int = 50) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def agreement_and_kl(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p, q = log_softmax(reference), log_softmax(candidate)
    return float((reference.argmax(1) == candidate.argmax(1)).mean()), float((np.exp(p) * (p - q)).sum(1).mean())


DEFAULT_CONFIGS = ("bnvar uniform=allocation:uniform;progress:false",
                   "random uniform=criterion:random;allocation:uniform;progress:false",
                   "red=method:red;progress:false",
                   "centripetal=method:centripetal;progress:false")


def parse_config(text: str) -> tuple[str, dict]:
    label, _, body = text.partition("=")
    options = {}
    for item in filter(None, body.split(";")):
        key, _, value = item.partition(":")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return label, options


# Config keys that set a variance-restoration constant of `passes.compensate` for that run (measurement only):
# ``restore_cap:3`` (RESTORE_CAP), ``restore_sources:bn,measured,propagated`` (RESTORE_SOURCES),
# ``restore_merges:false`` (RESTORE_MERGES).
RESTORE_KEYS = {"restore_cap": "RESTORE_CAP", "restore_sources": "RESTORE_SOURCES", "restore_merges": "RESTORE_MERGES"}


def split_restore(options: dict) -> tuple[dict, dict]:
    """(PruneOptions keywords, compensate-module constants) of one config."""
    constants = {}
    for key, name in RESTORE_KEYS.items():
        if key in options:
            value = options.pop(key)
            constants[name] = (tuple(str(value).split(",")) if name == "RESTORE_SOURCES" else
                               bool(value) if name == "RESTORE_MERGES" else float(value))
    return options, constants


def end_to_end(args, x: np.ndarray, reference: np.ndarray, path: Path, labels: np.ndarray) -> list[dict]:
    import time

    import onnx_prune

    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        for label, options in map(parse_config, args.configs):
            from onnx_prune.passes import compensate

            recorded = dict(options)
            options, constants = split_restore(dict(options))
            saved = {name: getattr(compensate, name) for name in constants}
            started = time.perf_counter()
            try:
                for name, value in constants.items():
                    setattr(compensate, name, value)
                pruned, report = onnx_prune.prune(str(path), target_macs=target, **options)
            finally:
                for name, value in saved.items():
                    setattr(compensate, name, value)
            scales = [g["variance_scale"] for g in report.details.get("compensation", {}).values()
                      if "variance_scale" in g]
            outputs = logits(pruned, x)
            agreement, kl = agreement_and_kl(reference, outputs)
            labelled = labels >= 0
            accuracy = float((outputs[labelled].argmax(1) == labels[labelled]).mean())
            merge = report.details.get("merge", {})
            row = {"target": target, "config": label, "options": recorded, "agreement": agreement, "kl": kl,
                   "accuracy": accuracy,
                   "macs_kept": report.macs_after / report.macs_before, "seconds": time.perf_counter() - started,
                   "merged": merge.get("merged"), "merge_tol": merge.get("tol"), "pruned": report.details.get("pruned"),
                   "variance_scales": scales}
            rows.append(row)
            extra = f" merged {row['merged']} at tol {row['merge_tol']:.3g}, pruned {row['pruned']}" if merge else ""
            if scales:
                extra += (f" restored {sum(s > 1 for s in scales)}/{len(scales)} groups, scale median "
                          f"{np.median(scales):.3f} max {max(scales):.3f}")
            print(f"{args.model} [{args.kind}] {target:.2f} {label:24s} agreement {agreement:.3f} KL {kl:.3f} "
                  f"accuracy {accuracy:.3f} "
                  f"MACs {row['macs_kept']:.3f} ({row['seconds']:.0f} s){extra}", flush=True)
    return rows


def fixed_plan(args, x: np.ndarray, reference: np.ndarray, path: Path) -> list[dict]:
    """Per target and config: the config's plan (built without restoration, so the allocation is the same),
    compensated without and with variance restoration, through the one rewrite."""
    from dataclasses import replace

    from onnx_prune.methods import MethodInput
    from onnx_prune.pipeline import _options, build_recipe

    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        for label, options in map(parse_config, args.configs):
            opts = _options(PruneOptions(**{**options, "target_macs": target, "restore_variance": False}), {})
            recipe = build_recipe(str(path), opts)
            bare = Plan({g: GroupPlan(p.keep, p.fold, p.merge) for g, p in recipe.plan.groups.items()})
            for restore in (False, True):
                given_opts = replace(opts, restore_variance=restore)
                given = MethodInput(recipe.prepared, constraints_of(given_opts), given_opts, None)
                plan, details = compensated(given, bare)
                pruned = ApplyPlanPass(recipe.prepared.analysis, plan)(recipe.prepared.model).model
                agreement, kl = agreement_and_kl(reference, logits(pruned, x))
                scales = [d["variance_scale"] for d in details.values() if "variance_scale" in d]
                rows.append({"target": target, "config": label, "restore": restore, "agreement": agreement,
                             "kl": kl, "variance_scales": scales})
                print(f"{args.model} [{args.kind}] {target:.2f} {label:24s} same plan, restore {str(restore):5s} "
                      f"agreement {agreement:.3f} KL {kl:.3f}"
                      + (f" scale max {max(scales):.3f} over {len(scales)} groups" if scales else ""), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2_imagenet", choices=pretrained_models.MODELS + FMNIST,
                        help="the Fashion-MNIST nets (as committed; --kind ignored) with --targets only")
    parser.add_argument("--kind", default="fused", choices=pretrained_models.KINDS)
    parser.add_argument("--keep", type=float, default=0.75, help="share of each group's channels kept")
    parser.add_argument("--eval-crops", type=int, default=100)
    parser.add_argument("--targets", help="prune the whole model at these shares of MACs instead (e.g. 0.9,0.8)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="with --targets: label=key:value;key:value ... (PruneOptions fields)")
    parser.add_argument("--fixed-plan", action="store_true",
                        help="with --targets: each config's plan once, compensated without and with variance "
                             "restoration (the allocation held fixed)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    x, labels = evaluation_data(args.model, args.eval_crops)
    path = model_file(args.model, args.kind)
    reference = logits(path, x)
    if args.targets:
        rows = (fixed_plan(args, x, reference, path) if args.fixed_plan else
                end_to_end(args, x, reference, path, labels))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        return 0
    prepared = prepare_folded(str(path))
    analysis = prepared.analysis
    opts = PruneOptions(progress=False)
    given = MethodInput(prepared, constraints_of(opts), opts, None)
    centripetal = CentripetalSelect(given.scoring)

    def measured(gplan: GroupPlan, gid: int) -> tuple[float, float]:
        plan = compensated(given, Plan({gid: gplan}))[0]
        return agreement_and_kl(reference, logits(ApplyPlanPass(analysis, plan)(prepared.model).model, x))

    rows = []
    print(f"{'group':>5} {'name':40s} {'size':>9} {'carriers':10s} linear | agreement / KL: bnvar, centripetal, "
          "centres only")
    for group in analysis.prunable_groups:
        n_keep = max(int(group.frozen.sum()), 1, int(round(args.keep * group.size)))
        scores = channel_scores(group, given.scoring, "bnvar", "domino-o")
        merged = centripetal(group, n_keep)
        results = {"bnvar": measured(GroupPlan(select_top(scores, group.frozen, n_keep)), group.id),
                   "centripetal": measured(merged, group.id),
                   "centres only": measured(GroupPlan(merged.keep), group.id)}
        carriers = sorted({analysis.node_ops.get(m.node, "?") for m in group.by_role("carrier")})
        linear = centripetal._reads_linear(group)
        rows.append({"group": group.id, "name": group.name, "size": group.size, "kept": n_keep,
                     "carriers": carriers, "linear": linear,
                     **{k: {"agreement": a, "kl": kl} for k, (a, kl) in results.items()}})
        print(f"{group.id:5d} {group.name[-40:]:40s} {group.size:4d}->{n_keep:<4d} {','.join(carriers)[:10]:10s} "
              f"{'yes' if linear else 'no ':6s} | " + "  ".join(f"{a:.2f}/{kl:.3f}" for a, kl in results.values()),
              flush=True)
    totals = {k: sum(r[k]["kl"] for r in rows) for k in ("bnvar", "centripetal", "centres only")}
    print("sum of KL over groups: " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "kl_sum": totals}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
