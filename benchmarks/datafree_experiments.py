"""Data-free pruning of the pretrained ImageNet MobileNetV2 at 90% of MACs: which ingredients matter (issue 15).

    python benchmarks/datafree_experiments.py [--kinds bn,fused] [--keep 0.9] [--eval-crops 200]
        [--only protect,consumer,rescale,rows,combo,post,cap,base,best,nocomp,sens | statcmp]
        [--powers 0.5,1.0] [--sens-criteria CRIT,..] [--out FILE.md]

Results (assembled from several runs): benchmarks/results/datafree_experiments.md.

Ingredients compared (every plan applied with expected-value compensation, `passes.compensate`):

* protect linear streams: groups whose producers reach an Add or a consumer with no nonlinearity in between
  (MobileNetV2's project convs tied by the residual Adds) are left whole (``protect``), or only they shrink
  (``only-linear``);
* criteria: l2, random, bnvar (library), ``consumer`` = sum over consumers of ||W_cons[:, c]||^2 (no statistics),
  ``bnvar-post``, ``share``, ``wshare`` (`output_scores`);
* variance restoration (``+rescale``): the kept channels of a shrunk group are scaled by
  sqrt(sum_all var_c e_c / sum_kept var_c e_c) at the consumers (e_c: consumer energy of channel c) through the
  plan's `fold`, so the consumers' pre-activation variance stays what it was; compensation then moves the
  means of the rescaled kept channels back (shift = (1 - s) m_c), so the means stay too; ``rows``: the same per
  consumer output row (`row_restored`);
* ``cap``: global allocation with a per-group max ratio; ``statcmp``: fused-export statistics against the BN ones;
* sensitivity allocation (``sens``): per group, the output KL on synthetic inputs when that group alone loses
  10% (its lowest-scoring channels, compensated); groups are then cut in proportion to 1/sensitivity.

Metric: top-1 agreement with the unpruned model on `--eval-crops` crops of the evaluation photos.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_prune.analysis.criteria import Scoring, channel_scores, filter_sets
from onnx_prune.analysis.expected import channel_statistics, synthetic_inputs
from onnx_prune.passes.allocate import Allocator, CostModel
from onnx_prune.passes.compensate import compensate
from onnx_prune.passes.constraints import Target
from onnx_prune.passes.plan import GroupPlan, Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.pipeline import prepare
from onnx_prune.runtime.cost import count_cost

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "models" / "pretrained")]
import photo_split  # noqa: E402

MODELS = {"fused": ROOT / "models" / "zoo" / "mobilenet_v2_imagenet.onnx",
          "bn": ROOT / "models" / "zoo" / "mobilenet_v2_imagenet_bn.onnx"}
PASS_THROUGH = {"BatchNormalization", "Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                "Transpose"}  # linear, one data input: a stream passes through them unchanged in kind
MERGING = {"Add", "Sub", "Sum"}


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def predict(model, x: np.ndarray, batch: int = 50) -> np.ndarray:
    s = session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def linear_groups(model, analysis) -> set[int]:
    """Groups with no nonlinearity between a producer and what reads it: a producer's output, followed through
    BatchNorm/Identity/reshapes, reaches an Add/Sum (a residual stream) or a consumer of the group directly."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = set()
    for group in analysis.prunable_groups:
        consumers = set(group.nodes("consumer"))
        producers = group.nodes("producer")
        if len(producers) > 1:
            out.add(group.id)
            continue
        by_name = {n.name: n for n in model.graph.node}
        frontier = [t for p in producers for t in by_name[p].output[:1]]
        seen = set()
        while frontier:
            tensor = frontier.pop()
            for node in readers.get(tensor, []):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if node.op_type in MERGING or node.name in consumers:
                    out.add(group.id)
                elif node.op_type in PASS_THROUGH:
                    frontier.append(node.output[0])
    return out


def consumer_energy(group, weights) -> np.ndarray:
    """Per channel: sum over consumers of ||W_cons[:, c]||^2."""
    score = np.zeros(group.size)
    for consumer in filter_sets(group, weights, ("consumer",)):
        np.add.at(score, consumer.channels, (consumer.rows[:, :-1] ** 2).sum(axis=1))
    return score


def output_scores(model, group, st, weights, criterion: str) -> np.ndarray:
    """Per channel c, summed over consumers and their outputs o (E[o, c] = ||W[o, c, taps]||^2, v = Var[x_c]):
    ``bnvar-post``: E[o, c] v_c (gamma_o / sigma_o)^2 with the BatchNorm right after the consumer (1 without):
    the error bnvar measures, in the units after that BatchNorm;
    ``share``: E[o, c] v_c / sum_c' E[o, c'] v_c': the share of output o's variance channel c carries
    (independent channels), unit-free so comparable across layers; ``wshare``: the same with every v_c = 1
    (weights only: for exports without BatchNorm, where v would come from synthetic inputs)."""
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    score = np.zeros(group.size)
    for member in group.by_role("consumer"):
        node = nodes[member.node]
        w = weights(member.param)
        if w.ndim < 2 or member.axis != 1 or (node.op_type == "Conv" and
                                               next((a.i for a in node.attribute if a.name == "group"), 1) != 1):
            continue
        read = st.reads.get(member.node)
        var = np.nan_to_num(read.var if read is not None else st.var)
        if criterion == "wshare":
            var = np.ones(group.size)
        sub = np.asarray(w, dtype=np.float64)[:, member.positions]
        energy = (sub.reshape(sub.shape[0], sub.shape[1], -1) ** 2).sum(axis=2) * var[member.channels]
        if criterion in ("share", "wshare"):
            energy = energy / np.maximum(energy.sum(axis=1, keepdims=True), 1e-30)
        else:
            after = readers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "BatchNormalization":
                bn = after[0]
                eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
                gain = weights(bn.input[1]) ** 2 / (weights(bn.input[4]) + eps)
                energy = energy * gain[:, None]
        np.add.at(score, member.channels, energy.sum(axis=0))
    return score


def rescaled(plan: Plan, analysis, stats, weights) -> Plan:
    """Each shrunk group's kept channels scaled at the consumers so the variance they carried stays."""
    out = Plan({})
    for gid, gplan in plan.groups.items():
        group, st = analysis.groups[gid], stats.get(gid)
        if st is None or gplan.fold is not None or gplan.merge is not None:
            out.groups[gid] = gplan
            continue
        var = np.where(np.isfinite(st.var), st.var, 0.0)
        carried = var * consumer_energy(group, weights)
        kept = carried[gplan.keep].sum()
        scale = float(np.sqrt(carried.sum() / kept)) if kept > 0 else 1.0
        fold = np.eye(group.size)[:, gplan.keep] * min(scale, 2.0)
        out.groups[gid] = GroupPlan(gplan.keep, fold, None)
    return out


def row_restored(model, analysis, plan: Plan, stats, cap: float = 2.0, unit_var: bool = False):
    """A copy of `model` in which every consumer row o of a shrunk group has its kept columns scaled by
    s_o = sqrt(sum_c W[o,c]^2 v_c / sum_kept W[o,c]^2 v_c) (capped), so each output's variance stays, and the
    mean the scaling moves, (1 - s_o) sum_kept W[o,c] m_c, added back: to the consumer's bias, or (a consumer
    without one, read only by a BatchNormalization) subtracted from that BatchNorm's running mean."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    arrays: dict[str, np.ndarray] = {}

    def array(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    for gid, gplan in plan.groups.items():
        group, st = analysis.groups[gid], stats.get(gid)
        if st is None or gplan.fold is not None or gplan.merge is not None:
            continue
        kept_mask = np.zeros(group.size, dtype=bool)
        kept_mask[gplan.keep] = True
        for member in group.by_role("consumer"):
            node = nodes[member.node]
            w = array(member.param)
            if not (node.op_type == "Conv" and member.axis == 1 and w.ndim == 4
                    and next((a.i for a in node.attribute if a.name == "group"), 1) == 1) \
                    and not (node.op_type == "Gemm" and w.ndim == 2 and member.axis == 1):
                continue  # only plain convs and Gemm(transB=1) here
            read = st.reads.get(member.node)
            var = np.nan_to_num(read.var if read is not None else st.var)
            if unit_var:
                var = np.ones_like(var)
            mean = np.nan_to_num(read.mean if read is not None else st.mean)
            cols = member.positions
            chans = member.channels
            sub = w[:, cols]
            energy = (sub.reshape(sub.shape[0], sub.shape[1], -1) ** 2).sum(axis=2)  # O x positions
            v = var[chans]
            keep = kept_mask[chans]
            total = energy @ v
            kept_part = energy[:, keep] @ v[keep]
            scale = np.where(kept_part > 0, np.sqrt(total / np.maximum(kept_part, 1e-30)), 1.0)
            scale = np.minimum(scale, cap)
            tap_sum = sub.reshape(sub.shape[0], sub.shape[1], -1).sum(axis=2)
            delta = (1.0 - scale) * (tap_sum[:, keep] @ mean[chans][keep])
            shape = (-1,) + (1,) * (w.ndim - 1)
            scaled = sub.copy()
            scaled[:, keep] = sub[:, keep] * scale.reshape(shape)
            w[:, cols] = scaled
            if len(node.input) > 2 and node.input[2] in inits:
                array(node.input[2])[:] += delta
            else:
                after = readers.get(node.output[0], [])
                if len(after) == 1 and after[0].op_type == "BatchNormalization":
                    array(after[0].input[3])[:] -= delta
                else:
                    raise ValueError(f"{node.name}: nowhere to put the mean correction")
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model


class Setup:
    def __init__(self, kind: str, x: np.ndarray):
        started = time.perf_counter()
        self.kind = kind
        self.prepared = prepare(str(MODELS[kind]))
        self.analysis = self.prepared.analysis
        self.reference = predict(self.prepared.model, x).argmax(1)
        self.x = x
        self.cost = count_cost(self.prepared.model)
        self.cost_model = CostModel.of(self.prepared.model, self.analysis,
                                       {n: c.macs for n, c in self.cost.per_node.items()})
        self.ids = [g.id for g in self.analysis.prunable_groups]
        self.stats = channel_statistics(self.prepared, self.ids)
        self.scoring = Scoring.for_prepared(self.prepared, bn_mode="folded")
        self.scoring.statistics = self.stats
        self.weights = self.prepared.weights()
        self.linear = linear_groups(self.prepared.model, self.analysis)
        self._scores = {}
        print(f"{kind}: {len(self.ids)} prunable groups, linear {sorted(self.linear)}, sources "
              f"{sorted({s.source for s in self.stats.values()})}, {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    def scores(self, criterion: str) -> dict[int, np.ndarray]:
        if criterion not in self._scores:
            groups = self.analysis.groups
            if criterion in ("bnvar-post", "share", "wshare"):
                self._scores[criterion] = {g: output_scores(self.prepared.model, groups[g], self.stats[g],
                                                            self.weights, criterion) for g in self.ids}
            elif criterion == "consumer":
                self._scores[criterion] = {g: consumer_energy(groups[g], self.weights) for g in self.ids}
            else:
                self._scores[criterion] = {g: channel_scores(groups[g], self.scoring, criterion) for g in self.ids}
        return self._scores[criterion]

    def plan(self, criterion: str, allocation: str, keep: float, groups: str, counts=None,
             max_ratio: float = 1.0) -> Plan:
        ids = [g for g in self.ids if (groups == "all") or (groups == "protect" and g not in self.linear)
               or (groups == "only-linear" and g in self.linear)]
        scores = {g: s for g, s in self.scores(criterion).items() if g in ids}
        allocator = Allocator(self.analysis, scores, self.cost_model, max_ratio=max_ratio, comparable=criterion in ("bnvar", "bnvar-post",
                                                                                   "share"))
        if counts is not None:
            return allocator.plan_for_counts(counts)
        return allocator.allocate(Target(macs=keep), allocation)

    def agreement(self, plan: Plan, restore=False, x=None) -> tuple[float, float]:
        model = self.prepared.model
        if restore in ("rows", "rows, unit var"):
            model = row_restored(model, self.analysis, plan, self.stats, unit_var=restore != "rows")
        elif restore:
            plan = rescaled(plan, self.analysis, self.stats, self.weights)
        if restore == "no compensation":
            pruned = ApplyPlanPass(self.analysis, plan)(model).model
        else:
            pruned = ApplyPlanPass(self.analysis, compensate(self.prepared, plan, self.stats))(model).model
        kept = count_cost(pruned).macs / self.cost.macs
        return float((predict(pruned, self.x).argmax(1) == self.reference).mean()), kept

    def pruned_model(self, plan: Plan):
        return ApplyPlanPass(self.analysis, compensate(self.prepared, plan, self.stats))(self.prepared.model).model


def sensitivity(setup: Setup, criterion: str, feeds: np.ndarray, share: float = 0.1) -> dict[int, float]:
    """Per group: KL(original || pruned) of the softmax outputs on synthetic inputs, that group alone losing
    `share` of its channels (lowest scores, compensated)."""
    name = session(setup.prepared.model).get_inputs()[0].name
    ref = session(setup.prepared.model).run(None, {name: feeds})[0]
    p = _softmax(ref)
    out = {}
    scores = setup.scores(criterion)
    for gid in setup.ids:
        group = setup.analysis.groups[gid]
        allocator = Allocator(setup.analysis, {gid: scores[gid]}, setup.cost_model)
        plan = allocator.plan_for_counts({gid: group.size - max(1, int(round(share * group.size)))})
        if not plan.groups:
            out[gid] = 0.0
            continue
        logits = session(setup.pruned_model(plan)).run(None, {name: feeds})[0]
        q = _softmax(logits)
        out[gid] = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
    return out


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sensitivity_counts(setup: Setup, sens: dict[int, float], keep: float, ids, power: float = 1.0,
                       cap: float = 0.6) -> dict[int, int]:
    """Counts reaching the MAC target with group g's removed share r_g proportional to
    (MACs one channel share of g saves / sensitivity_g)^power, at most `cap`: with a damage growing as
    s_g r_g^2, minimising the total damage for the MACs saved gives r_g proportional to macs_g / s_g (power 1).
    Sensitivities are floored at 1% of their median (a group that loses nothing measurable is not free)."""
    allocator = Allocator(setup.analysis, {g: setup.scores("l2")[g] for g in ids}, setup.cost_model)
    target = Target(macs=keep)
    full = {g: setup.analysis.groups[g].size for g in ids}
    base = allocator.fraction(full, target)
    saved = {g: max(base - allocator.fraction({**full, g: max(1, full[g] // 2)}, target), 1e-9) for g in ids}
    floor = 0.01 * float(np.median([sens[g] for g in ids]))
    weight = {g: (saved[g] / max(sens[g], floor)) ** power for g in ids}
    top = max(weight.values())

    def counts_at(f):
        return allocator.settle({g: full[g] - int(min(cap, f * weight[g] / top) * full[g]) for g in ids})
    lo, hi = 0.0, 1.0
    while allocator.fraction(counts_at(hi), target) > keep and hi < 1e6:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if allocator.fraction(counts_at(mid), target) > keep:
            lo = mid
        else:
            hi = mid
    return counts_at(hi)


def compare_statistics() -> None:
    """Per group: Spearman correlation of the fused export's channel statistics (no BatchNorm: propagated or
    synthetic) with the BN export's data-free BatchNorm ones, and the median variance ratio."""
    from scipy.stats import spearmanr

    bn, fused = prepare(str(MODELS["bn"])), prepare(str(MODELS["fused"]))
    ids = [g.id for g in bn.analysis.prunable_groups]
    sb, sf = channel_statistics(bn, ids), channel_statistics(fused, ids)
    print("| group | size | fused source | Spearman(var) | Spearman(mean) | median var_fused / var_bn |")
    print("|---|---|---|---|---|---|")
    for g in ids:
        ok = np.isfinite(sb[g].var) & np.isfinite(sf[g].var)
        ratio = np.median(sf[g].var[ok] / np.maximum(sb[g].var[ok], 1e-12))
        print(f"| {g} | {bn.analysis.groups[g].size} | {sf[g].source} | {spearmanr(sb[g].var[ok], sf[g].var[ok])[0]:.2f}"
              f" | {spearmanr(sb[g].mean[ok], sf[g].mean[ok])[0]:.2f} | {ratio:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="bn,fused")
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--eval-crops", type=int, default=200)
    parser.add_argument("--only", default="protect,consumer,rescale,rows,combo,post,base,best,nocomp,sens")
    parser.add_argument("--powers", default="0.5,1.0", help="sensitivity allocation exponents (experiment 3)")
    parser.add_argument("--sens-criteria", default="", help="criteria for experiment 3 (default: bnvar on the "
                        "BN export, consumer on the fused one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as a markdown table here "
                        "(benchmarks/results/datafree_experiments.md is assembled by hand from several runs)")
    args = parser.parse_args(argv)
    images, _ = photo_split.crops("eval", args.eval_crops)
    x = photo_split.normalize(images).astype(np.float32)
    only = set(args.only.split(","))
    if "statcmp" in only:
        compare_statistics()
        return 0
    lines = [f"| export | experiment | criterion | allocation | groups | variance restored | MACs kept | agreement |",
             "|---|---|---|---|---|---|---|---|"]

    def row(setup, experiment, criterion, allocation, groups, restore, plan=None):
        started = time.perf_counter()
        plan = plan or setup.plan(criterion, allocation, args.keep, groups)
        agreement, kept = setup.agreement(plan, restore)
        lines.append(f"| {setup.kind} | {experiment} | {criterion} | {allocation} | {groups} | "
                     f"{restore if isinstance(restore, str) else ('group' if restore else 'no')} | "
                     f"{kept:.3f} | {agreement:.3f} |")
        print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")

    for kind in args.kinds.split(","):
        setup = Setup(kind, x)
        lines.append(f"| {kind} | statistics: {', '.join(sorted({s.source for s in setup.stats.values()}))} "
                     "| | | | | | |")
        if "protect" in only:
            for criterion in ("l2", "random", "bnvar"):
                for allocation in ("uniform", "global"):
                    if criterion == "random" and allocation == "global":
                        continue
                    for groups in ("all", "protect"):
                        row(setup, "1", criterion, allocation, groups, False)
            for criterion in ("bnvar", "random"):
                row(setup, "1", criterion, "uniform", "only-linear", False)
        if "consumer" in only:
            for allocation in ("uniform", "global"):
                for groups in ("all", "protect"):
                    row(setup, "2", "consumer", allocation, groups, False)
        if "rescale" in only:
            for criterion in ("bnvar", "consumer"):
                for groups in ("all", "protect"):
                    row(setup, "2b", criterion, "uniform", groups, True)
        if "rows" in only:
            for criterion, allocation in (("bnvar", "uniform"), ("consumer", "uniform"), ("bnvar", "global")):
                row(setup, "2c", criterion, allocation, "all", "rows")
        if "combo" in only:
            for criterion in ("bnvar", "consumer"):
                row(setup, "2d", criterion, "global", "all", True)
        if "base" in only:
            for criterion, allocation in (("bnvar", "uniform"), ("bnvar", "global"), ("consumer", "uniform")):
                row(setup, "base", criterion, allocation, "all", False)
        if "final" in only:  # the recommended recipes against today's bnvar, on more crops
            for criterion, allocation in (("bnvar", "uniform"), ("bnvar", "global"),
                                          ("share" if kind == "bn" else "consumer",
                                           "global" if kind == "bn" else "uniform")):
                row(setup, "final", criterion, allocation, "all", False)
        if "cap" in only:
            crits = ("share", "bnvar") if kind == "bn" else ("wshare", "consumer")
            for criterion in crits:
                for cap in (0.5, 0.3):
                    plan = setup.plan(criterion, "global", args.keep, "all", max_ratio=cap)
                    row(setup, "cap", criterion, f"global, max-ratio {cap}", "all", False, plan)
        if "best" in only:
            for criterion, allocation, restore in (("share", "global", "rows"), ("wshare", "global", False),
                                                   ("wshare", "uniform", False), ("wshare", "global", "rows"),
                                                   ("consumer", "uniform", "rows, unit var"),
                                                   ("wshare", "global", "rows, unit var")):
                row(setup, "2g", criterion, allocation, "all", restore)
        if "nocomp" in only:
            for criterion in ("bnvar", "consumer"):
                row(setup, "2f", criterion, "uniform", "all", "no compensation")
        if "post" in only:
            for criterion in ("bnvar-post", "share"):
                for allocation in ("uniform", "global"):
                    row(setup, "2e", criterion, allocation, "all", False)
        if "sens" in only:
            feeds = _synthetic(setup)
            for criterion in args.sens_criteria.split(",") if args.sens_criteria else \
                    ("bnvar" if kind == "bn" else "consumer",):
                started = time.perf_counter()
                sens = sensitivity(setup, criterion, feeds)
                print(f"{kind}: sensitivity in {time.perf_counter() - started:.0f} s: "
                      + ", ".join(f"{g}:{v:.3g}" for g, v in sorted(sens.items())), file=sys.stderr, flush=True)
                for groups in ("all",):
                    ids = [g for g in setup.ids if groups == "all" or g not in setup.linear]
                    for power in [float(v) for v in args.powers.split(",")]:
                        counts = sensitivity_counts(setup, {g: sens[g] for g in ids}, args.keep, ids, power)
                        allocator = Allocator(setup.analysis, {g: setup.scores(criterion)[g] for g in ids},
                                              setup.cost_model)
                        plan = allocator.plan_for_counts(counts)
                        row(setup, "3", criterion, f"sens^{power}", groups, False, plan)
                        if kind == "bn":
                            row(setup, "3", criterion, f"sens^{power}", groups, "rows", plan)
    return 0


def _synthetic(setup: Setup) -> np.ndarray:
    """32 synthetic (1/f noise) inputs at the model's normalisation, as the analysis generates them."""
    feeds = synthetic_inputs(setup.prepared.model, samples=32, batch=32, seed=1)
    name = session(setup.prepared.model).get_inputs()[0].name
    return np.concatenate([f[name] for f in feeds])[:32].astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
