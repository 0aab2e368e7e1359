"""Blended pruning criteria (METHODS.md §3): cluster a pool of criteria, then search the blend's weights.

1. Every criterion of the pool scores every group once (``pool_scores``).
2. Criteria are clustered (``analysis.blend``); the search uses the model-level clusters (the groups' mean rank
   correlation), so that one weight per cluster is shared by all groups.
3. Each cluster is represented in the blend by its *fittest* member: every criterion of the pool is measured
   alone first (the report lists them all), so a cluster of near-duplicates contributes the one that prunes best.
4. The blend ``B = sum_c alpha_c * s_c / ||s_c||`` (per group, over the representatives; alpha_c in [0, 1],
   one calibration factor per cluster, shared by all groups) is searched with scipy's differential evolution.
   The initial population holds every corner (one representative alone, i.e. its single-criterion plan), the
   equal blend and a seeded Latin hypercube; DE only ever replaces a member by a better one, so the blend found
   is at least as good as the best single criterion of the pool, by construction.

Fitness (lower is better) compares the pruned model with the original on calibration inputs (a user's .npz)
or, without them, on generated inputs: for outputs that look like class scores, ``1 - top-1 agreement`` with
the relative output error as tie-break (scaled below one prediction's worth, so agreement always decides
first); for other outputs the relative error ``||y' - y|| / ||y||``.  Candidates are pruned in memory and run
with onnxruntime (basic graph optimisation, one thread), across ``workers`` processes.  DE runs with
``updating='deferred'``: a whole generation is evaluated before the population changes, so the result for a
seed does not depend on the worker count.
"""
from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from scipy.optimize import differential_evolution

from onnx_prune.analysis.blend import (CALIBRATION_POOL, DEFAULT_POOL, DEFAULT_THRESHOLD, PoolScores,
                                       blend_scores, summarize_clusters, unit_scores)
from onnx_prune.analysis.channels import ChannelAnalysis
from onnx_prune.analysis.criteria import (CALIBRATION_CRITERIA, CRITERION_NAMES, Scoring, calibration_scores,
                                          channel_scores)
from onnx_prune.errors import PruneError
from onnx_prune.passes.allocate import Allocator, CostModel, Target, kept_ids
from onnx_prune.passes.plan import Plan
from onnx_prune.passes.rewrite import ApplyPlanPass
from onnx_prune.runtime.cost import count_cost
from onnx_prune.runtime.fidelity import load_npz_inputs, make_inputs, relative_error

GENERATIONS = 10        # DE iterations after the initial population
POPULATION = 16         # individuals per generation (DE needs at least 5)
FITNESS_SAMPLES = 32    # generated inputs when no calibration data is given
Feeds = list[dict[str, np.ndarray]]


# --- scores ----------------------------------------------------------------------

def pool_scores(prepared, group_ids: list[int], pool: tuple[str, ...], aggregate: str = "domino-o",
                normalize: bool = False, seed: int = 0, landmarks: int = 9,
                calib_inputs: Feeds | None = None) -> PoolScores:
    """criterion -> group id -> score per channel, for every criterion of `pool` (computed once).

    Activation criteria need `calib_inputs`; groups no consumer reads visibly fall back to l2 (as `prune` does)."""
    scoring = Scoring.for_prepared(prepared, seed, landmarks, calib=calib_inputs)  # statistics for bnvar, lazily
    groups = prepared.analysis.groups
    scores: PoolScores = {}
    for name in pool:
        if name in CALIBRATION_CRITERIA:
            if calib_inputs is None:
                raise PruneError(f"criterion '{name}' needs calibration data (--calib data.npz)")
            found = calibration_scores(prepared.model, prepared.analysis, group_ids, calib_inputs, name)
            scores[name] = {gid: found[gid] if gid in found else channel_scores(groups[gid], scoring, "l2", aggregate)
                            for gid in group_ids}
        elif name in CRITERION_NAMES:
            scores[name] = {gid: channel_scores(groups[gid], scoring, name, aggregate, normalize) for gid in group_ids}
        else:
            raise PruneError(f"unknown criterion '{name}' in the blend pool (choose from "
                             f"{', '.join(CRITERION_NAMES + CALIBRATION_CRITERIA)})")
    return scores


def default_pool(calibrated: bool) -> tuple[str, ...]:
    return DEFAULT_POOL + (CALIBRATION_POOL if calibrated else ())


def prunable_ids(prepared) -> list[int]:
    return [g.id for g in prepared.analysis.prunable_groups]


def criteria_clusters(prepared, group_ids: list[int] | None = None, pool: tuple[str, ...] | None = None,
                      aggregate: str = "domino-o", threshold: float = DEFAULT_THRESHOLD,
                      calib_inputs: Feeds | None = None, seed: int = 0, landmarks: int = 9) -> dict:
    """The clustering summary `analyze` shows (format it with `analysis.blend.format_cluster_summary`)."""
    group_ids = prunable_ids(prepared) if group_ids is None else group_ids
    pool = pool or default_pool(calib_inputs is not None)
    scores = pool_scores(prepared, group_ids, pool, aggregate, False, seed, landmarks, calib_inputs)
    return summarize_clusters(scores, prepared.analysis, threshold)


# --- fitness ---------------------------------------------------------------------

def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = 1   # one process per core instead: workers scale, threads would contend
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: Feeds) -> list[np.ndarray]:
    """Each output, the feeds' results stacked along a new axis 0."""
    runs = [session.run(None, feed) for feed in feeds]
    return [np.stack([run[i] for run in runs]) for i in range(len(runs[0]))]


def is_class_scores(output: np.ndarray) -> bool:
    """Stacked [S, N, K] classifier or [S, N, K, H, W] per-pixel scores (the rule of `fidelity.compare`)."""
    return output.ndim in (3, 5) and output.shape[2] > 1 and output.dtype.kind == "f"


@dataclass(frozen=True)
class Measure:
    """The fitness of one plan: `loss` (lower is better) and what it is made of."""
    loss: float
    top1_agreement: float | None   # mean over class-score outputs; None when there is none
    relative_error: float           # mean over outputs
    macs_kept: float | None         # fraction of the original MACs

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def output_loss(reference: np.ndarray, candidate: np.ndarray, use_agreement: bool) -> tuple[float, float | None, float]:
    """(loss, top-1 agreement or None, relative error) of one output."""
    error = relative_error(reference, candidate)
    if not use_agreement:
        return error, None, error
    agreement = float(np.mean(reference.argmax(axis=2) == candidate.argmax(axis=2)))
    predictions = reference.size // reference.shape[2]
    tie_break = (1.0 if np.isinf(error) else error / (1.0 + error)) / (predictions + 1)  # < one prediction
    return (1.0 - agreement) + tie_break, agreement, error


@dataclass
class FitnessContext:
    """Everything a candidate evaluation reads; pickled once into each worker process."""
    model: onnx.ModelProto
    analysis: ChannelAnalysis
    units: PoolScores                 # unit-norm scores of every criterion of the pool
    target: Target
    cost: CostModel | None
    allocation: str
    round_to: int
    max_ratio: float
    feeds: Feeds
    metric: str                       # "agreement" or "error" (see `resolve_metric`)
    reference: list[np.ndarray] = field(default_factory=list)


def resolve_metric(metric: str, reference: list[np.ndarray]) -> str:
    if metric not in ("auto", "agreement", "error"):
        raise PruneError(f"unknown blend metric '{metric}' (auto, agreement or error)")
    if metric == "agreement" and not any(is_class_scores(r) for r in reference):
        raise PruneError("metric 'agreement' needs an output of class scores ([N, K] or [N, K, H, W])")
    if metric == "auto":
        return "agreement" if any(is_class_scores(r) for r in reference) else "error"
    return metric


_INSTALLED: "Fitness | None" = None


def _installed() -> "Fitness":
    return _INSTALLED


def _install(context: FitnessContext) -> None:
    """Pool initializer: each worker builds its Fitness once from the context it was sent."""
    global _INSTALLED
    _INSTALLED = Fitness(context)


class Fitness:
    """Weights over the pool -> blended scores -> Plan -> pruned model in memory -> Measure.

    Pickles as a reference to the Fitness its worker process installed at start-up (`_install`), so handing it
    to a process pool per generation costs nothing; equal plans are measured once per process."""

    def __init__(self, context: FitnessContext):
        self.context = context
        self.pool = tuple(context.units)
        self._measured: dict[bytes, Measure] = {}

    def __reduce__(self):
        return _installed, ()

    def plan(self, weights: np.ndarray) -> Plan:
        c = self.context
        scores = blend_scores(c.units, dict(zip(self.pool, weights)))
        return Allocator(c.analysis, scores, c.cost, c.round_to, c.max_ratio).allocate(c.target, c.allocation)

    def measure_plan(self, plan: Plan) -> Measure:
        key = b"|".join(np.int64(g).tobytes() + p.keep.tobytes() for g, p in sorted(plan.groups.items()))
        if key not in self._measured:
            self._measured[key] = self._measure(plan)
        return self._measured[key]

    def _measure(self, plan: Plan) -> Measure:
        c = self.context
        pruned = ApplyPlanPass(c.analysis, plan)(c.model).model
        outputs = _run(_session(pruned), c.feeds)
        parts = [output_loss(r, o, c.metric == "agreement" and is_class_scores(r))
                 for r, o in zip(c.reference, outputs)]
        agreements = [a for _, a, _ in parts if a is not None]
        macs = None
        if c.cost is not None and c.cost.macs:
            macs = c.cost.evaluate(kept_ids(c.analysis, plan))[0] / c.cost.macs
        return Measure(float(np.mean([p[0] for p in parts])), float(np.mean(agreements)) if agreements else None,
                       float(np.mean([p[2] for p in parts])), macs)

    def measure(self, weights: np.ndarray) -> Measure:
        return self.measure_plan(self.plan(weights))

    def __call__(self, weights: np.ndarray) -> float:
        return self.measure(weights).loss


@dataclass
class OnColumns:
    """DE's objective: alpha over the blend's components, placed into the pool's weight vector."""
    fitness: Fitness
    columns: list[int]

    def __call__(self, alpha: np.ndarray) -> float:
        weights = np.zeros(len(self.fitness.pool))
        weights[self.columns] = alpha
        return self.fitness(weights)


# --- search ----------------------------------------------------------------------

class Progress:
    """DE's map (counts evaluations) and callback: after each generation, the best loss so far on stderr, and
    the time budget (a True return stops DE)."""

    def __init__(self, mapper, generations: int, time_budget: float | None, start: float, show: bool):
        self.mapper, self.generations, self.time_budget, self.start, self.show = (
            mapper, generations, time_budget, start, show)
        self.evaluations, self.generation = 0, 0
        self.out_of_time = False

    def __call__(self, func, iterable):
        results = list(self.mapper(func, iterable))
        self.evaluations += len(results)
        return results

    def callback(self, intermediate_result) -> bool:
        self.generation += 1
        elapsed = time.perf_counter() - self.start
        if self.show:
            print(f"blend: generation {self.generation}/{self.generations}  best loss {intermediate_result.fun:.6f}  "
                  f"evaluations {self.evaluations}  {elapsed:.1f} s", file=sys.stderr, flush=True)
        self.out_of_time = self.time_budget is not None and elapsed >= self.time_budget
        return self.out_of_time


def initial_population(dims: int, size: int, seed: int) -> np.ndarray:
    """Every corner (one component alone), the equal blend, then a seeded Latin hypercube in [0, 1]^dims."""
    fixed = np.vstack([np.eye(dims), np.ones((1, dims))])
    n = max(size - len(fixed), 0)
    rng = np.random.default_rng(seed)
    strata = np.column_stack([rng.permutation(n) for _ in range(dims)]) if n else np.zeros((0, dims))
    return np.vstack([fixed, (strata + rng.random((n, dims))) / max(n, 1)])


def _de_seed(seed: int) -> dict:
    """scipy >= 1.15 takes `rng`; older versions `seed` (same meaning for an int)."""
    return {"rng" if "rng" in inspect.signature(differential_evolution).parameters else "seed": seed}


def search_alpha(objective: OnColumns, dims: int, mapper, generations: int, population: int, seed: int,
                 time_budget: float | None, start: float, show: bool) -> tuple[np.ndarray, dict]:
    """Differential evolution over alpha in [0, 1]^dims; (best alpha, search facts)."""
    init = initial_population(dims, max(population, dims + 1, 5), seed)
    progress = Progress(mapper, generations, time_budget, start, show)
    # polish=False: gradient polishing is pointless on a step function; tol=0: run the generations asked for
    # (stop early only when every member has the same loss)
    result = differential_evolution(objective, [(0.0, 1.0)] * dims, maxiter=generations, init=init, polish=False,
                                    tol=0.0, updating="deferred", workers=progress, callback=progress.callback,
                                    **_de_seed(seed))
    stopped = ("time budget" if progress.out_of_time else
               "max generations" if progress.generation >= generations else "converged")
    return np.asarray(result.x), {"generations_run": progress.generation, "population": len(init),
                                  "evaluations": int(result.nfev), "stopped": stopped}


# --- inputs ----------------------------------------------------------------------

def generated_inputs(model: onnx.ModelProto, seed: int, count: int = FITNESS_SAMPLES) -> Feeds:
    """`count` random samples: one batch of `count` when the batch dim is dynamic, else `count` feeds."""
    try:
        feeds = make_inputs(model, seed, samples=1, batch=count)
        first = next(iter(feeds[0].values()))
        return feeds if first.shape[:1] == (count,) else make_inputs(model, seed, samples=count)
    except ValueError as err:
        raise PruneError(f"cannot generate inputs for the blend's fitness ({err}); give calibration data") from None


def _plain(value):
    """JSON-ready copy: numpy scalars and arrays to Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_blend_weights(report: dict, path: str | os.PathLike) -> None:
    """Write a blend report (from `blend_plan`) as JSON; `load_blend_weights` reads its weights back."""
    with open(path, "w") as f:
        json.dump(_plain(report), f, indent=1)
        f.write("\n")


def load_blend_weights(path: str | os.PathLike) -> dict[str, float]:
    """criterion -> weight, from a file written by `save_blend_weights`."""
    try:
        with open(path) as f:
            weights = json.load(f)["weights"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PruneError(f"blend weights {os.fspath(path)}: not a blend report ({err})") from None
    known = CRITERION_NAMES + CALIBRATION_CRITERIA
    if not weights or any(name not in known for name in weights):
        raise PruneError(f"blend weights {os.fspath(path)}: criteria must be among {', '.join(known)}")
    return {name: float(w) for name, w in weights.items()}


# --- the method ------------------------------------------------------------------

def _cost_model(prepared) -> CostModel | None:
    try:
        cost = count_cost(prepared.model)
    except ValueError:  # dynamic spatial dims
        return None
    return CostModel.of(prepared.model, prepared.analysis, {n: c.macs for n, c in cost.per_node.items()})


def blend_allocation(opts) -> str:
    """The blend search's allocation: uniform or global (the default "auto" is uniform here: the search
    measures the whole pruned model itself; per-group sensitivity curves are refused)."""
    if opts.allocation == "sensitivity":
        raise PruneError("--criterion blend searches on the whole pruned model: use --allocation uniform or global")
    return "uniform" if opts.allocation == "auto" else opts.allocation


def _options_record(opts, target: Target) -> dict:
    return {"target": target.describe(), "allocation": opts.allocation, "aggregate": opts.aggregate,
            "normalize": opts.normalize, "round_to": opts.round_to, "max_ratio": opts.max_ratio, "seed": opts.seed}


def blend_plan(prepared, opts, group_ids: list[int] | None = None, *, pool: tuple[str, ...] | None = None,
               threshold: float = DEFAULT_THRESHOLD, generations: int = GENERATIONS, population: int = POPULATION,
               workers: int = 1, time_budget: float | None = None, calib_inputs: Feeds | None = None,
               fitness_samples: int = FITNESS_SAMPLES, metric: str = "auto",
               blend_weights: "str | os.PathLike | dict | None" = None, progress: bool = True) -> tuple[Plan, dict]:
    """A Plan from a searched blend of pruning criteria, and a JSON-ready report.

    - `opts`: a `PruneOptions`; read are target(), allocation, aggregate, normalize, round_to, max_ratio, seed
      (DE, generated inputs), landmarks and calib.
    - `group_ids`: the groups that may shrink (default: every prunable group).
    - `pool`: the criteria (default DEFAULT_POOL, plus CALIBRATION_POOL with calibration data); `threshold`: the
      clustering cut on 1 - rho.
    - `generations`, `population`: DE iterations and individuals; `workers`: processes evaluating candidates;
      `time_budget`: seconds from the start, checked after each generation.
    - `calib_inputs`: feeds for the fitness and the activation criteria (default: loaded from `opts.calib` when
      set; else the fitness runs on `fitness_samples` generated inputs and the pool is data-free).
    - `metric`: "auto" (agreement where an output holds class scores, else error), "agreement" or "error".
    - `blend_weights`: a saved report (path) or criterion -> weight dict, re-applied without clustering or search.
    - `progress`: one line per generation on stderr.
    """
    start = time.perf_counter()
    analysis = prepared.analysis
    group_ids = prunable_ids(prepared) if group_ids is None else list(group_ids)
    from onnx_prune.pipeline import constraints_of

    target = constraints_of(opts).target
    cost = _cost_model(prepared)
    if calib_inputs is None and getattr(opts, "calib", None):
        try:
            calib_inputs = load_npz_inputs(opts.calib, prepared.model)
        except (ValueError, OSError) as err:
            raise PruneError(f"--calib {opts.calib}: {err}") from None
    scoring_args = (opts.aggregate, opts.normalize, opts.seed, opts.landmarks, calib_inputs)

    if blend_weights is not None:
        weights = blend_weights if isinstance(blend_weights, dict) else load_blend_weights(blend_weights)
        units = unit_scores(pool_scores(prepared, group_ids, tuple(weights), *scoring_args))
        plan = Allocator(analysis, blend_scores(units, weights), cost, opts.round_to,
                         opts.max_ratio).allocate(target, blend_allocation(opts))
        return plan, {"method": "blend", "mode": "re-applied", "weights": weights, **_options_record(opts, target)}

    if generations < 0 or population < 5 or workers < 1:
        raise PruneError("blend search needs generations >= 0, population >= 5 and workers >= 1")
    pool = tuple(pool or default_pool(calib_inputs is not None))
    raw = pool_scores(prepared, group_ids, pool, *scoring_args)
    clusters = summarize_clusters(raw, analysis, threshold)
    feeds = calib_inputs if calib_inputs is not None else generated_inputs(prepared.model, opts.seed, fitness_samples)
    data = (f"calibration inputs ({len(feeds)} feed(s))" if calib_inputs is not None else
            f"generated inputs (seed {opts.seed}, {fitness_samples} samples, standard normal)")
    reference = _run(_session(prepared.model), feeds)
    context = FitnessContext(prepared.model, analysis, unit_scores(raw), target, cost, blend_allocation(opts),
                             opts.round_to, opts.max_ratio, feeds, resolve_metric(metric, reference), reference)
    fitness = Fitness(context)
    processes = None
    if workers > 1:
        processes = multiprocessing.get_context("spawn").Pool(workers, initializer=_install, initargs=(context,))
    try:
        mapper = processes.map if processes else map
        singles = dict(zip(pool, mapper(fitness.measure, list(np.eye(len(pool))))))
        if progress:
            best = min(pool, key=lambda name: singles[name].loss)
            print(f"blend: {len(pool)} single criteria measured, best {best} (loss {singles[best].loss:.6f})  "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        components = [min(members, key=lambda name: (singles[name].loss, name != rep, pool.index(name)))
                      for members, rep in zip(clusters["model"]["clusters"], clusters["model"]["representatives"])]
        columns = [pool.index(name) for name in components]
        if len(components) == 1:
            alpha, search = np.ones(1), {"generations_run": 0, "population": 0, "evaluations": 0,
                                         "stopped": "one cluster: nothing to blend"}
        else:
            alpha, search = search_alpha(OnColumns(fitness, columns), len(components), mapper, generations,
                                         population, opts.seed, time_budget, start, progress)
    finally:
        if processes:  # every map has returned (or raised): nothing is left to finish
            processes.terminate()
            processes.join()
    chosen = dict(zip(components, (float(a) for a in alpha)))
    # in pool order, the order Fitness sums in: re-applying the weights adds the same floats the same way
    weights = {name: chosen[name] for name in sorted(chosen, key=pool.index)}
    full = np.zeros(len(pool))
    full[columns] = alpha
    plan = fitness.plan(full)
    measured = fitness.measure_plan(plan)
    report = {
        "method": "blend", "mode": "searched", **_options_record(opts, target),
        "fitness_data": data,
        "metric": ("1 - top-1 agreement with the original (relative output error breaks ties)"
                   if context.metric == "agreement" else "relative output error against the original"),
        "pool": list(pool), "clusters": clusters,
        "components": [{"criterion": name, "cluster": members, "alpha": chosen[name]}
                       for name, members in zip(components, clusters["model"]["clusters"])],
        "weights": weights,
        "fitness": measured.to_dict(),
        "singles": {name: m.to_dict() for name, m in singles.items()},
        "search": {**search, "generations": generations, "workers": workers, "time_budget": time_budget,
                   "evaluations": search["evaluations"] + len(pool), "seconds": time.perf_counter() - start},
    }
    return plan, _plain(report)
