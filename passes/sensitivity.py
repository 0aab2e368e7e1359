"""Sensitivity allocation: how many channels each group gives up, from the measured damage of pruning it alone.

Uniform allocation takes the same share of every group; global allocation ranks all channels by one score,
which needs scores in the same units in every layer.  Neither knows that the network is far more sensitive to
some groups than to others (issue 15: pruning one MobileNetV2 group by 10% keeps a median 0.84 top-1
agreement, the worst 0.36).  Here each shrinking group is pruned *alone* -- by the method's own selection and
compensation, through the real rewrite -- at a few shares of its free channels, and the damage to the model's
outputs (`output_damage`: KL divergence of a classifier's softmax) is measured on a few inputs: the
calibration data when given, otherwise synthetic natural-image-like inputs (`analysis.expected.
synthetic_inputs`), so it is data-free.  The allocator then removes channels in order of least measured
damage per MAC (or parameter, or predicted millisecond) saved, for any target (`damage_counts`).

The same curves, measured with OBS selection and reconstruction instead, drive the calibrated `obs` method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

DEFAULT_SHARES = (0.1, 0.25, 0.5)  # shares of a group's free channels removed when measuring its curve
SYNTHETIC_SAMPLES = 32             # synthetic inputs measuring the damage without data
# The data-free default measures damage curves when they cost at most this many MACs of evaluation (groups x
# shares x samples x the model's MACs): about a minute on one CPU core, which covers MobileNetV2 (7e11) and
# EfficientNet-Lite0; ResNet-50 (1.4e13) would take ten, so it gets uniform unless asked.
AUTO_BUDGET_MACS = 2e12
# Damage measured on synthetic images may remove at most this share of a group (`synthetic_hedge`): 1/f noise can
# hide damage that real inputs show.  With 0.35 the data-free default wins 18 of the 20 pretrained and
# Fashion-MNIST benchmark cells against uniform allocation (16 without; the SE-net at 80% 0.677 -> 0.894;
# benchmarks/results/sensitivity_variants.md).
SYNTHETIC_MAX_REMOVED = 0.35


def output_damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean KL divergence of the softmax of a 2-D output (a classifier's logits) from the reference's; for any
    other output, its squared error over the reference's energy."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        if ref.ndim == 2 and ref.shape[1] > 1:
            p = np.exp(ref - ref.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            log_q = out - out.max(1, keepdims=True)
            log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
            total += float(np.mean(np.sum(p * (np.log(p + 1e-300) - log_q), axis=1)))
        else:
            total += float(np.sum((ref - out) ** 2) / max(np.sum(ref ** 2), 1e-30))
    return total


@dataclass
class DamageCurve:
    """Output damage of pruning one group alone at a few removal counts (by the method's selection and
    compensation, or, for `obs`, OBS selection and reconstruction of its consumers); 0 removed costs 0."""
    group: int
    removed: list[int]      # channel counts removed, increasing, starting at 0
    damage: list[float]     # measured output damage at each

    def at(self, count: float) -> float:
        return float(np.interp(count, self.removed, self.damage))

    def to_dict(self) -> dict:
        return dict(self.__dict__)



def synthetic_hedge(source: str, max_ratio: float, target_kind: str | None) -> float | None:
    """The share of a group that damage curves measured on synthetic images may remove for a MAC or parameter
    target where --max-ratio is 1 (no limit): SYNTHETIC_MAX_REMOVED, since those images can hide damage real
    inputs show (the Fashion-MNIST SE-net's first convolutions and SE squeezes look free on 1/f noise).  None:
    no hedge -- curves measured on --calib data, a --max-ratio below 1 given (it replaces the hedge), or a
    ratio or latency target (whose reach the hedge could silently cut short)."""
    if source != "synthetic" or max_ratio < 1.0 or target_kind not in ("macs", "params"):
        return None
    return SYNTHETIC_MAX_REMOVED


def damage_scores(curves: dict[int, DamageCurve], analysis, cost_model, kind: str = "macs",
                  extrapolate: bool = False) -> dict[int, np.ndarray]:
    """Per group, a score per free channel such that the allocator's global ranking (lowest first, scores
    comparable across groups) removes channels in order of least measured damage per MAC (or parameter) saved:
    the k-th channel a group gives up scores the damage curve's slope there (made non-decreasing) over what one
    channel of the group costs.  Channels beyond the measured range score +inf-like (removed last), or with
    `extrapolate` the last measured slope, rising (a target beyond every curve stays reachable)."""
    full = np.ones(len(analysis.id_group), dtype=bool)
    base = cost_model.evaluate(full)[0 if kind == "macs" else 1]
    scores = {}
    for gid, curve in curves.items():
        group = analysis.groups[gid]
        free = np.nonzero(~group.frozen)[0]
        without = full.copy()
        without[(analysis.id_group == gid) & np.isin(analysis.id_channel, free)] = False
        saved = base - cost_model.evaluate(without)[0 if kind == "macs" else 1]
        per_channel = max(saved / max(len(free), 1), 1e-30)
        top = curve.removed[-1]
        slopes = np.diff([curve.at(k) for k in range(top + 1)])
        slopes = np.maximum.accumulate(np.maximum(slopes, 0.0)) / per_channel
        score = np.full(group.size, np.inf)
        rest = 1.0 + np.arange(len(free) - top)
        beyond = max(slopes[-1] if len(slopes) else 0.0, 1e-30) * (1.0 + rest / max(len(free), 1)) \
            if extrapolate else 1e30 * rest
        values = np.concatenate([slopes, beyond])
        score[free] = values[:len(free)]
        scores[gid] = score
    return scores


def damage_counts(prepared, curves: dict[int, DamageCurve], group_ids, target, cost_model, round_to=1,
                  max_ratio: float = 1.0, make_allocator=None, extrapolate: bool = False) -> dict[int, int]:
    """Channels each group keeps for `target` (a `passes.constraints.Target`) so that the summed measured
    damage is least: the allocator's global ranking over `damage_scores` (greedy on the damage per MAC, or per
    parameter, saved).  Groups without a curve (no measurable consumer) stay whole.  `make_allocator(scores)`:
    the caller's Allocator factory (e.g. one that knows a latency model); default: one from the arguments."""
    from onnx_prune.passes.allocate import Allocator

    kind = "params" if target.kind == "params" else "macs"
    scores = damage_scores(curves, prepared.analysis, cost_model, kind, extrapolate)
    for gid in group_ids:
        if gid not in scores:
            scores[gid] = np.full(prepared.analysis.groups[gid].size, 1e300)
    if make_allocator is None:
        allocator = Allocator(prepared.analysis, scores, cost_model, round_to, max_ratio)
    else:
        allocator = make_allocator(scores)
    allocator.comparable = True  # the scores are damage per MAC in every group: rank them as they are
    return allocator.counts_for(target, "global")


def affordable(model, groups: int, cost, shares=DEFAULT_SHARES, samples: int = SYNTHETIC_SAMPLES
               ) -> tuple[str, str]:
    """The data-free allocation `auto` resolves to, and why: "sensitivity" where its damage curves cost at most
    `AUTO_BUDGET_MACS` of evaluation and synthetic inputs can be built (every input dim fixed), else "uniform".
    Decided from counts, never from a clock, so that the same model and options give the same output."""
    from onnx_prune.runtime.sessions import input_specs, resolve_input_shapes

    try:
        resolve_input_shapes(input_specs(model), None, 1)
    except ValueError as err:
        return "uniform", f"auto without data: uniform, no synthetic inputs to measure damage on ({err})"
    if cost is None or not cost.macs:
        return "uniform", "auto without data: uniform, the model's MACs could not be counted"
    work = groups * len(shares) * samples * cost.macs
    if work > AUTO_BUDGET_MACS:
        return "uniform", (f"auto without data: uniform, measuring damage curves would cost {work / 1e12:.1f} "
                           f"TMAC of evaluation (budget {AUTO_BUDGET_MACS / 1e12:.0f}); --allocation sensitivity "
                           "asks for them")
    return "sensitivity", (f"auto without data: sensitivity on synthetic images ({work / 1e12:.2f} TMAC of "
                           "evaluation)")


def damage_inputs(model, calibration: list[dict] | None, samples: int = SYNTHETIC_SAMPLES, seed: int = 0,
                  normalization: tuple | None = None, shapes: dict | None = None) -> tuple[list[dict], str]:
    """(feeds, source): about `samples` calibration samples spread over the set (`spread_samples`), or
    synthetic 1/f-noise images without data."""
    if calibration:
        return spread_samples(model, calibration, samples), "calibration"
    from onnx_prune.analysis.expected import synthetic_inputs

    return synthetic_inputs(model, samples=samples, seed=seed, normalization=normalization, shapes=shapes), \
        "synthetic"


def spread_samples(model, feeds: list[dict], samples: int, batch: int = 16) -> list[dict]:
    """About `samples` calibration samples spread evenly over all of `feeds` (loaders often yield crops
    photo by photo: the first ones may all come from one photo), as feeds of up to `batch` samples where the
    model's batch dim is dynamic, else whole feeds evenly spaced."""
    from onnx_prune.passes.repair import dynamic_batch
    from onnx_prune.runtime.calibration import sample_count

    total = sum(sample_count(f) for f in feeds)
    if total <= samples:
        return list(feeds)
    if not dynamic_batch(model):
        per_feed = max(1, sample_count(feeds[0]))
        picks = np.unique(np.linspace(0, len(feeds) - 1, max(1, samples // per_feed)).round().astype(int))
        return [feeds[i] for i in picks]
    picks = np.unique(np.linspace(0, total - 1, samples).round().astype(int))
    starts = np.cumsum([0] + [sample_count(f) for f in feeds])
    chosen = {name: np.concatenate([f[name][picks[(picks >= lo) & (picks < hi)] - lo]
                                    for f, lo, hi in zip(feeds, starts[:-1], starts[1:])])
              for name in feeds[0]}  # (only the picked samples are copied)
    return [{name: array[i:i + batch] for name, array in chosen.items()} for i in range(0, len(picks), batch)]


def removal_counts(size: int, n_free: int, settle: Callable[[int], int], shares=DEFAULT_SHARES) -> list[int]:
    """Channel counts removed at each share of the free channels, after the caller's rounding (`settle`: kept
    count -> the kept count the constraints allow); distinct, increasing, above 0."""
    removed = set()
    for share in shares:
        want = max(1, int(round(share * n_free)))
        kept = settle(size - want)
        if 0 < size - kept <= n_free:
            removed.add(size - kept)
    return sorted(removed)


def selection_damage_curves(model, allocator, group_ids, feeds: list[dict],
                            pruned_model: Callable[[object], object], shares=DEFAULT_SHARES, select=None,
                            progress: Callable[[str], None] | None = None) -> dict[int, DamageCurve]:
    """Per group in `group_ids`: the output damage on `feeds` when that group alone loses `shares` of its free
    channels, chosen by `allocator`'s scores (or `select`, the method's own selection) and turned into a model
    by `pruned_model(plan)` (the caller's compensation and rewrite).  `model` is the prepared model the plans
    refer to.  Groups whose rounding leaves nothing to remove get no curve (the allocator keeps them whole)."""
    from onnx_prune.runtime.sessions import make_session

    reference_session = make_session(model)
    reference = [reference_session.run(None, feed) for feed in feeds]
    analysis = allocator.analysis
    curves = {}
    for step, gid in enumerate(sorted(group_ids)):
        group = analysis.groups[gid]
        n_free = int((~group.frozen).sum())
        counts = removal_counts(group.size, n_free,
                                lambda kept: allocator.settle({gid: kept}, snap=False)[gid], shares)
        if not counts:
            continue
        damage = [0.0]
        for removed in counts:
            plan = allocator.plan_for_counts({gid: group.size - removed}, select, snap=False)
            session = make_session(pruned_model(plan))
            damage.append(float(np.mean([output_damage(ref, session.run(None, feed))
                                         for ref, feed in zip(reference, feeds)])))
        curves[gid] = DamageCurve(gid, [0] + counts, damage)
        if progress is not None:
            progress(f"sensitivity: group {step + 1}/{len(group_ids)} {group.name}: "
                     + ", ".join(f"-{k}/{group.size} -> {d:.3g}" for k, d in zip(counts, damage[1:])))
    return curves
