"""Latency of a pruned model predicted from per-layer timings on the user's own runtime (NetAdapt-style tables).

How the table is built (`measure_table`), on one provider, thread count and batch:
- every Conv/Gemm/MatMul whose input or output channels belong to a prunable group is cut out as a tiny ONNX
  graph (the layer, with the activation onnxruntime fuses into it) and timed at a few widths of each varying
  axis: a grid of multiples of the axis's *unit* (32 for wide layers, smaller for narrow ones) plus probes at
  m+1, m+2, m+4, ... next to a multiple m of the unit, which measure the cost of a misaligned width;
- a Conv is timed between two cheap 1x1 "adapter" convs (16 channels in and out) so that onnxruntime lays it
  out as it would inside the model (its blocked NCHWc kernels need widths divisible by the vector block; a
  misaligned width also costs re-layouts around the layer); the adapters' own time, measured once per width
  and spatial size, is subtracted;
- the whole model is measured once as it is and once uniformly slimmed, and the sum of the layer times is
  calibrated to those two runs: predicted = fixed + scale * sum (the rest: pooling, adds, copies, overheads).

How a layer's time is predicted (`fit_curve`): the measured grid is a piecewise-linear *base* curve in the
width; a width w whose largest power-of-two divisor a(w) is below the unit costs base(w) * penalty[a(w)],
penalty being the measured probe / base ratio of that alignment class.  A dense layer whose input and output
channels both shrink costs full * rho_out(w_out) * rho_in(w_in) (rho = curve / curve at full width); a
depthwise layer follows its one width.  The model is the sum over layers, so `predict(kept_counts)` is
deterministic given the table, and so is everything built on it: timing only builds the table.

Tables are cached as JSON per (model hash, provider, threads, batch, onnxruntime version, CPU) in
``$XDG_CACHE_HOME/onnx-prune`` (default ``~/.cache/onnx-prune``); `load_or_measure` also reads and writes a
user-given file for reproducible runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.errors import PruneError

from .sessions import CPU, make_session, provider_chain, provider_name

TABLE_VERSION = 4
MAX_UNIT = 32                 # widths divisible by this count as aligned for every kernel we know of
ADAPTER_CHANNELS = 16         # divisible by the NCHWc block of AVX2 (8) and AVX-512 (16)
GRID_POINTS = 6               # aligned widths measured per axis (plus the full width)
FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh")
TIMED_OPS = ("Conv", "Gemm", "MatMul")
QUANTILE = 0.0                # of the timed runs (0: the fastest): other processes' load only ever adds time
AUTO_HOPS = 4                 # round_to="auto" steps consider this many successive fastest widths below
WINDOW = 32                   # fastest_width looks at most this many counts below the allowed one


# --- widths and curves: plain functions of the measured numbers ---------------------------------------------


def unit_for(full: int) -> int:
    """The alignment a layer of `full` channels is measured at: the largest power of two up to 32 that fits
    twice in it (vector blocks are 8 or 16 channels, so a 16-channel layer is measured at 8 and 16)."""
    unit = 1
    while unit * 2 <= MAX_UNIT and unit * 2 * 2 <= full:
        unit *= 2
    return unit


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): an aligned layer does not get faster with
    more channels, so a dip in the measured base is noise."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def alignment(width: int, unit: int) -> int:
    """Largest power of two dividing `width`, capped at `unit`."""
    a = 1
    while a < unit and width % (a * 2) == 0:
        a *= 2
    return a


def widths_to_measure(full: int) -> list[int]:
    """Aligned grid (multiples of the unit, at most GRID_POINTS of them, the full width always) and probes
    m + 1, m + 2, m + 4, ... (below the unit) next to the multiple m of the unit nearest half the width."""
    unit = unit_for(full)
    multiples = list(range(unit, full + 1, unit))
    if len(multiples) > GRID_POINTS:
        picks = np.linspace(0, len(multiples) - 1, GRID_POINTS).round().astype(int)
        multiples = [multiples[i] for i in sorted(set(picks.tolist()))]
    middle = max(unit, int(round(full / 2 / unit)) * unit)
    probes = [middle + d for d in (1, 2, 4, 8, 16) if d < unit and middle + d < full]
    return sorted(set(multiples + [full] + probes))


@dataclass(frozen=True)
class Curve:
    """Time of one layer against the width of one axis, fitted from measured (width, ms) points."""
    full: int
    unit: int
    base_widths: tuple[int, ...]
    base_ms: tuple[float, ...]
    penalty: dict[int, float]     # alignment class -> time / base time (classes below the unit)

    def ms(self, width: int) -> float:
        width = int(width)
        if width <= 0:
            return 0.0
        xs, ys = self.base_widths, self.base_ms
        if width < xs[0]:
            base = ys[0] * width / xs[0]  # below the grid: proportional to the width
        elif width > xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
            base = ys[-1] + slope * (width - xs[-1])
        else:
            base = float(np.interp(width, xs, ys))
        return max(base, 0.0) * self.penalty.get(alignment(width, self.unit), 1.0)

    def ratio(self, width: int) -> float:
        """Time at `width` over time at the full width."""
        full = self.ms(self.full)
        return self.ms(width) / full if full > 0 else width / self.full


def fit_curve(full: int, widths: list[int], ms: list[float]) -> Curve:
    """Piecewise-linear base through the aligned points (and the full width), made non-decreasing, plus a
    penalty (at least 1) per alignment class measured at the probes.  A class without a probe takes the penalty of the nearest smaller class
    that has one (none: 1).  Deterministic: only the numbers decide."""
    unit = unit_for(full)
    points = sorted(zip((int(w) for w in widths), (float(m) for m in ms)))
    base = [(w, m) for w, m in points if alignment(w, unit) >= unit or w == full]
    if not base:
        base = points
    base_curve = Curve(full, unit, tuple(w for w, _ in base), tuple(monotone([m for _, m in base])), {})
    ratios: dict[int, list[float]] = {}
    for w, m in points:
        a = alignment(w, unit)
        if a < unit and w != full:
            reference = base_curve.ms(w)
            if reference > 0:
                ratios.setdefault(a, []).append(m / reference)
    penalty, last = {}, 1.0
    for a in (2 ** i for i in range(int(math.log2(unit)) if unit > 1 else 0)):
        if a in ratios:  # never below 1: a misaligned width that measures faster is noise, not a kernel
            last = max(1.0, float(np.median(ratios[a])))
        penalty[a] = last
    return Curve(full, unit, base_curve.base_widths, base_curve.base_ms, penalty)


def curve_from_dict(data: dict) -> Curve:
    return fit_curve(int(data["full"]), data["widths"], data["ms"])


# --- which groups set a layer's widths -----------------------------------------------------------------------


def _width_terms(analysis, tensor: str, prunable: set[int]) -> dict | None:
    """How a tensor's channel count follows the kept counts: const + sum positions_g * k_g / size_g."""
    layout = analysis.layouts.get(tensor)
    if layout is None:
        return None
    groups = analysis.id_group[layout.ids]
    terms, const = {}, 0
    for gid, positions in zip(*np.unique(groups, return_counts=True)):
        if int(gid) in prunable:
            terms[str(int(gid))] = [int(positions), int(analysis.groups[int(gid)].size)]
        else:
            const += int(positions)
    return {"full": int(len(layout.ids)), "const": const, "groups": terms} if terms else None


def width_of(terms: dict, counts: dict[int, int]) -> int:
    """Channel count of a tensor when each group keeps counts[g] (absent: the whole group)."""
    total = terms["const"]
    for gid, (positions, size) in terms["groups"].items():
        total += positions * counts.get(int(gid), size) / size
    return max(1, int(round(total)))


# --- the model ---------------------------------------------------------------------------------------------


@dataclass
class LatencyModel:
    """Predicted latency (ms) of the model for any kept channel counts, from a measured table (JSON-able)."""
    table: dict
    curves: dict[tuple[str, str], Curve] = field(init=False, repr=False)
    by_group: dict[int, list[str]] = field(init=False, repr=False)
    measure: Callable[[dict[int, int]], float] | None = field(default=None, repr=False)  # counts -> whole-model ms
    persist: Callable[[dict], None] | None = field(default=None, repr=False)            # saves an updated table

    def __post_init__(self):
        if self.table.get("version") != TABLE_VERSION:
            raise PruneError(f"latency table version {self.table.get('version')} is not {TABLE_VERSION}; "
                             "measure it again")
        self.curves = {(name, axis): curve_from_dict(entry[axis])
                       for name, entry in self.table["nodes"].items() for axis in ("out", "in") if axis in entry}
        self.by_group = {}
        for name, entry in self.table["nodes"].items():
            for axis in ("out", "in"):
                for gid in entry.get(axis, {}).get("terms", {}).get("groups", {}):
                    self.by_group.setdefault(int(gid), []).append(name)
        self.by_group = {g: sorted(set(names)) for g, names in self.by_group.items()}

    # --- prediction
    @property
    def fixed_ms(self) -> float:
        return float(self.table["calibration"]["fixed_ms"])

    @property
    def scale(self) -> float:
        return float(self.table["calibration"]["scale"])

    @property
    def original_ms(self) -> float:
        """The measured latency of the unpruned model."""
        return float(self.table["calibration"]["points"][0]["measured_ms"])

    def node_ms(self, name: str, counts: dict[int, int]) -> float:
        entry = self.table["nodes"][name]
        full_ms = float(entry["full_ms"])
        if full_ms <= 0:
            return 0.0
        kind, ms = entry["kind"], full_ms
        if kind == "linear":  # grouped convs: proportional to the output width
            terms = entry["out"]["terms"]
            return full_ms * width_of(terms, counts) / terms["full"]
        for axis in ("out", "in"):
            if axis in entry and entry[axis].get("terms"):
                ms *= self.curves[(name, axis)].ratio(width_of(entry[axis]["terms"], counts))
        return ms

    def layers_ms(self, counts: dict[int, int], names=None) -> float:
        return sum(self.node_ms(name, counts) for name in (self.table["nodes"] if names is None else names))

    def predict(self, kept_counts: dict[int, int]) -> float:
        """Predicted latency in ms when group g keeps kept_counts[g] channels (absent groups stay whole)."""
        counts = {int(g): int(k) for g, k in kept_counts.items()}
        return self.calibrated(self.layers_ms(counts))

    def calibrated(self, layers_ms: float) -> float:
        """Whole-model ms for a sum of layer times: the piecewise-linear curve through the measured points (the
        whole model, uniformly slimmed, and those latency targets added, `target_counts`), made non-decreasing,
        proportional below the lowest point, with the last slope above the highest.  A table with one point
        uses fixed + scale * sum (`calibrate`)."""
        points = self.table["calibration"]["points"]
        if len(points) < 2:
            return self.fixed_ms + self.scale * layers_ms
        merged: dict[float, list[float]] = {}
        for point in points:
            merged.setdefault(round(float(point["layers_ms"]), 9), []).append(float(point["measured_ms"]))
        xs = sorted(merged)
        ys = monotone([float(np.mean(merged[x])) for x in xs])
        if layers_ms <= xs[0]:
            return ys[0] * layers_ms / xs[0] if xs[0] > 0 else ys[0]
        if layers_ms >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
            return ys[-1] + slope * (layers_ms - xs[-1])
        return float(np.interp(layers_ms, xs, ys))

    def target_counts(self, groups: dict, fraction: float, round_to="auto", rounds: int = 3,
                      tolerance: float = 0.03) -> dict[int, int]:
        """`latency_counts` for `fraction` of the original's latency.  Where this model can measure (`measure`,
        set by `load_or_measure` when it may time and cache), the chosen counts are timed (in alternation with
        the original) and added as a calibration point, then the choice is made again on the refined curve, up
        to `rounds` times or until within `tolerance`: a greedy choice favours layers whose savings the table
        overestimates, and the measured points correct exactly that.  Without `measure` (a given table file)
        nothing is timed: deterministic given the table."""
        goal = fraction * self.original_ms
        counts = latency_counts(self, groups, goal, round_to)
        for _ in range(rounds if self.measure is not None else 0):
            measured_counts = [p.get("counts") for p in self.table["calibration"]["points"]]
            key = {str(g): int(k) for g, k in sorted(counts.items())}
            if key in measured_counts:
                break
            ms = self.measure(counts)
            self.table["calibration"]["points"].append({"target": fraction, "counts": key, "measured_ms": ms,
                                                        "layers_ms": self.layers_ms(counts)})
            if self.persist is not None:
                self.persist(self.table)
            if abs(ms / goal - 1) <= tolerance:
                break
            counts = latency_counts(self, groups, goal, round_to)
        return counts

    def group_ms(self, group_id: int, count: int, counts: dict[int, int] | None = None) -> float:
        """Predicted time of the layers whose widths group `group_id` sets, at `count` kept channels (others at
        `counts`, default whole): the part of `predict` that depends on this group."""
        counts = dict(counts or {})
        counts[int(group_id)] = int(count)
        return self.scale * self.layers_ms(counts, self.by_group.get(int(group_id), []))

    def fastest_width(self, group_id: int, at_most: int, near: int, counts: dict[int, int] | None = None,
                      at_least: int = 1) -> int:
        """Among the counts in [near - window_below(near), at_most] (never below
        `at_least`), the one giving the most channels per predicted millisecond of the group's layers; ties go
        to the larger count.  A width the kernels handle badly (misaligned) loses to a nearby aligned one;
        with a smooth curve the largest allowed count wins."""
        at_most, near = int(at_most), int(min(near, at_most))
        low = max(int(at_least), 1, near - window_below(near))
        if int(group_id) not in self.by_group or at_most <= low:
            return max(at_most, int(at_least), 1)
        best, best_rate = at_most, -1.0
        for count in range(at_most, low - 1, -1):
            ms = self.group_ms(group_id, count, counts)
            rate = count / ms if ms > 0 else math.inf
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = count, rate
        return best

    def to_json(self) -> str:
        return json.dumps(self.table, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LatencyModel":
        return cls(json.loads(text))


# --- latency-targeted allocation ---------------------------------------------------------------------------


@dataclass
class GroupChoice:
    """What the allocation needs of one group: its size, the fewest channels it may keep, and each channel's
    score divided by the group's mean |score| (so that groups compare; removing a channel costs its score)."""
    size: int
    floor: int
    normalised_scores: np.ndarray
    frozen: np.ndarray | None = None
    cap: int | None = None        # most channels it may keep (e.g. what merging left); None: its size

    @property
    def start(self) -> int:
        return self.size if self.cap is None else max(self.floor, min(self.size, self.cap))

    def removal_costs(self) -> np.ndarray:
        """Cumulative cost of removing the cheapest free channels: costs[j] = cost of removing j of them."""
        frozen = np.zeros(self.size, dtype=bool) if self.frozen is None else self.frozen
        free = np.nonzero(~frozen)[0]
        order = free[np.lexsort((free, self.normalised_scores[free]))]
        return np.concatenate([[0.0], np.cumsum(np.abs(self.normalised_scores[order]))])


def window_below(count: int) -> int:
    """How far below a count `fastest_width` and the allocation's steps look: an eighth of it, but at least 8
    (to reach the next multiple of a vector block) and at most WINDOW, never more than half the count."""
    return max(1, min(WINDOW, max(8, count // 8), count // 2))


def step_candidates(model: LatencyModel, gid: int, count: int, floor: int, round_to,
                    counts: dict[int, int]) -> list[int]:
    """Counts a group may step down to from `count`: with round_to="auto" the fastest width just below
    (`fastest_width`) and the next AUTO_HOPS - 1 fastest widths below that one, else every multiple of `round_to`
    (one integer, or a dict: group -> its multiple) within the window below (at least the next one), so
    that a step may jump over widths the kernels handle badly.  Never below `floor`; empty at the floor."""
    if count <= floor:
        return []
    if isinstance(round_to, dict):  # a multiple per group (--round-to size)
        round_to = round_to.get(gid, 1)
    if round_to == "auto":  # the fastest width below, and the fastest below that...: a step may skip a slow one
        chain, width = [], count
        while width > floor and len(chain) < AUTO_HOPS:
            width = max(floor, model.fastest_width(gid, width - 1, width - 1, counts, at_least=floor))
            chain.append(width)
        return chain
    step = max(1, int(round_to))
    lowest = max(step, math.ceil(floor / step) * step)  # kept counts stay multiples of the step, never zero
    low = max(lowest, count - max(step, min(WINDOW, count // 2)))  # far enough to reach the next multiple of 32
    return list(range((count - 1) // step * step, low - 1, -step))


def latency_counts(model: LatencyModel, groups: dict[int, GroupChoice], target_ms: float,
                   round_to="auto") -> dict[int, int]:
    """Kept counts per group whose predicted latency is at most `target_ms`, chosen greedily: at each step
    the group whose next step down loses the least score per predicted millisecond saved shrinks.  Steps
    that save no time are never taken; when none is left the counts stop where they are (the caller reports
    the predicted latency).  Deterministic: ties go to the lower group id."""
    counts = {gid: g.start for gid, g in groups.items()}
    if round_to != "auto":  # start from counts the rounding allows
        steps = round_to if isinstance(round_to, dict) else {gid: int(round_to) for gid in groups}
        counts = {gid: min(g.size, max(g.floor, math.ceil(counts[gid] / steps.get(gid, 1)) * steps.get(gid, 1)))
                  for gid, g in groups.items()}
    costs = {gid: g.removal_costs() for gid, g in groups.items()}
    frozen_n = {gid: int(g.frozen.sum()) if g.frozen is not None else 0 for gid, g in groups.items()}
    neighbours: dict[int, set[int]] = {gid: set() for gid in groups}
    for gid in groups:
        for name in model.by_group.get(gid, []):
            entry = model.table["nodes"][name]
            for axis in ("out", "in"):
                for other in entry.get(axis, {}).get("terms", {}).get("groups", {}):
                    if int(other) in groups:
                        neighbours[gid].add(int(other))
    predicted = model.predict(counts)

    def candidate(gid):
        """(score lost per ms saved, count) of the group's best step down, None when no step saves time."""
        count = counts[gid]
        now = model.group_ms(gid, count, counts)
        cost_curve = costs[gid]
        top = len(cost_curve) - 1  # free channels
        best_step = None
        for lower in step_candidates(model, gid, count, groups[gid].floor, round_to, counts):
            saved = now - model.group_ms(gid, lower, counts)
            if lower >= count or saved <= 1e-12:
                continue
            loss = cost_curve[min(groups[gid].size - lower, top)] - cost_curve[min(groups[gid].size - count, top)]
            step = (loss / saved, -lower)
            if best_step is None or step < best_step:
                best_step = step
        return None if best_step is None else (best_step[0], -best_step[1])

    best = {gid: candidate(gid) for gid in groups}
    while predicted > target_ms:
        live = [(c[0], gid) for gid, c in best.items() if c is not None]
        if not live:
            break
        _, gid = min(live)
        counts[gid] = best[gid][1]
        predicted = model.predict(counts)
        for other in neighbours[gid] | {gid}:
            best[other] = candidate(other)
    for gid in counts:
        counts[gid] = max(counts[gid], frozen_n[gid], 1)
    return counts


# --- measuring ---------------------------------------------------------------------------------------------


def model_hash(model: onnx.ModelProto) -> str:
    """sha256 of the graph structure and every initializer's bytes, without serialising the whole model."""
    from .sessions import model_without_initializers

    digest = hashlib.sha256(model_without_initializers(model).SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(tensor.SerializeToString())
    return digest.hexdigest()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(model_sha256: str, provider: str, threads: int | None, batch: int,
              shapes: dict | None = None) -> dict:
    """What a table depends on.  The CPU is part of it: a cache directory may be shared between machines."""
    return {"table_version": TABLE_VERSION, "model_sha256": model_sha256, "provider": provider_name(provider),
            "threads": threads, "batch": int(batch), "onnxruntime": ort.__version__, "cpu": cpu_name(),
            "machine": platform.machine(), "shapes": {k: list(v) for k, v in sorted((shapes or {}).items())}}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-prune"


def cache_path(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / f"latency_{name}.json"


def _timed_ms(model: onnx.ModelProto, feed: dict, provider: str, threads: int | None, repeat: int,
              warmup: int = 2) -> float:
    from .bench import _timed_runs_ms, run_clock

    session = make_session(model, provider_chain(provider), threads)
    return float(np.quantile(_timed_runs_ms(session, feed, warmup, repeat, run_clock(threads, provider)[1]),
                             QUANTILE))


def _tiny_model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "latency_probe", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _rand(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * 0.1


@dataclass
class _LayerSpec:
    """One timed layer: its node, weight, input dims and the activation fused into it."""
    node: onnx.NodeProto
    weight: np.ndarray
    has_bias: bool
    input_dims: list[int]
    activation: onnx.NodeProto | None
    activation_inits: list


class _Timer:
    """Builds the tiny graphs and times them in interleaved rounds.

    All graphs of one axis (every width, plus the adapter baselines not measured yet) get their sessions
    first; then each round runs every one of them once, and a graph's time is the QUANTILE of its rounds.
    Load from other processes thus falls on all widths alike instead of on whichever ran during a burst."""

    def __init__(self, provider: str, threads: int | None, repeat: int, opset: int, seed: int = 0):
        self.provider, self.threads, self.repeat, self.opset = provider, threads, repeat, opset
        self.rng = np.random.default_rng(seed)
        self.baselines: dict[tuple, float] = {}
        self.measured = 0

    def time_all(self, graphs: list[tuple[onnx.ModelProto, dict]], warmup: int = 2) -> list[float]:
        sessions = [make_session(model, provider_chain(self.provider), self.threads) for model, _ in graphs]
        for session, (_, feed) in zip(sessions, graphs):
            for _ in range(warmup):
                session.run(None, feed)
        from .bench import run_clock

        self.clock, clock = run_clock(self.threads, self.provider)
        timings = np.empty((len(graphs), self.repeat))
        for round_index in range(self.repeat):
            for index, (session, (_, feed)) in enumerate(zip(sessions, graphs)):
                began = clock()
                session.run(None, feed)
                timings[index, round_index] = clock() - began
        self.measured += len(graphs)
        return [float(np.quantile(row, QUANTILE)) * 1e3 for row in timings]

    def _adapter(self, name, cin, cout, src, dst):
        w = numpy_helper.from_array(_rand(self.rng, [cout, cin, 1, 1]), f"{name}_w")
        return helper.make_node("Conv", [src, w.name], [dst], name=name, kernel_shape=[1, 1]), w

    def baseline_graph(self, key: tuple) -> tuple[onnx.ModelProto, dict]:
        """The two adapters alone around `width` channels (A -> width -> A)."""
        width, batch, spatial = key
        a = ADAPTER_CHANNELS
        n1, w1 = self._adapter("adapt_in", a, width, "x", "mid")
        n2, w2 = self._adapter("adapt_out", width, a, "mid", "y")
        model = _tiny_model([n1, n2], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, a, *spatial])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2], self.opset)
        return model, {"x": _rand(self.rng, [batch, a, *spatial])}

    def conv_graph(self, spec: _LayerSpec, cin: int, cout: int, out_spatial: tuple[int, ...]):
        """(model, feed, baseline keys to subtract half of each) for the layer at these widths."""
        node, w_full = spec.node, spec.weight
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        depthwise = group > 1 and w_full.shape[1] == 1 and group == w_full.shape[0]
        if depthwise:
            cin = cout
        weight = _rand(self.rng, [cout, cin if not depthwise else 1, *w_full.shape[2:]])
        inits = [numpy_helper.from_array(weight, "w")]
        inputs = ["conv_in", "w"]
        if spec.has_bias:
            inits.append(numpy_helper.from_array(_rand(self.rng, [cout]), "b"))
            inputs.append("b")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if depthwise:
            attrs["group"] = cout
        batch, spatial = spec.input_dims[0], tuple(spec.input_dims[2:])
        a = ADAPTER_CHANNELS
        use_in = cin >= a  # a stem reading a few input channels reads the graph input directly
        nodes = []
        if use_in:
            n, w = self._adapter("adapt_in", a, cin, "x", "conv_in")
            nodes.append(n)
            inits.append(w)
        x_channels = a if use_in else cin
        nodes.append(helper.make_node("Conv", inputs, ["conv_out"], name="layer", **attrs))
        last = "conv_out"
        if spec.activation is not None:
            act = spec.activation
            extra = [i.name for i in spec.activation_inits]
            nodes.append(helper.make_node(act.op_type, ["conv_out", *extra], ["act_out"], name="act",
                                          **{x.name: helper.get_attribute_value(x) for x in act.attribute}))
            inits += list(spec.activation_inits)
            last = "act_out"
        n, w = self._adapter("adapt_out", cout, a, last, "y")
        nodes.append(n)
        inits.append(w)
        x_name = "x" if use_in else "conv_in"
        model = _tiny_model(nodes, [helper.make_tensor_value_info(x_name, TensorProto.FLOAT,
                                                                  [batch, x_channels, *spatial])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, self.opset)
        feed = {x_name: _rand(self.rng, [batch, x_channels, *spatial])}
        keys = [(cout, batch, out_spatial)] + ([(cin, batch, spatial)] if use_in else [])
        return model, feed, keys

    def dense_graph(self, spec: _LayerSpec, k: int, n: int):
        """Gemm / MatMul with a constant weight: input [..., k] -> [..., n], timed alone."""
        node = spec.node
        lead = list(spec.input_dims[:-1])
        inits, inputs = [], ["x"]
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            inits.append(numpy_helper.from_array(_rand(self.rng, [n, k] if trans_b else [k, n]), "w"))
            inputs.append("w")
            if spec.has_bias:
                inits.append(numpy_helper.from_array(_rand(self.rng, [n]), "b"))
                inputs.append("b")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        else:
            inits.append(numpy_helper.from_array(_rand(self.rng, [k, n]), "w"))
            inputs.append("w")
            attrs = {}
        layer = helper.make_node(node.op_type, inputs, ["y"], name="layer", **attrs)
        model = _tiny_model([layer], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, self.opset)
        return model, {"x": _rand(self.rng, [*lead, k])}, []

    def measure(self, built: list[tuple]) -> list[float]:
        """Times of the layers built by conv_graph / dense_graph, adapters subtracted (never below zero)."""
        missing = sorted({key for _, _, keys in built for key in keys if key not in self.baselines})
        graphs = [(model, feed) for model, feed, _ in built] + [self.baseline_graph(key) for key in missing]
        times = self.time_all(graphs)
        self.baselines.update(zip(missing, times[len(built):]))
        return [max(total - 0.5 * sum(self.baselines[key] for key in keys), 0.0)
                for total, (_, _, keys) in zip(times, built)]


def _layer_specs(model: onnx.ModelProto, dims: dict) -> dict[str, _LayerSpec]:
    inits = {t.name: t for t in model.graph.initializer}
    from onnx_prune.analysis.layers import readers_of

    readers = readers_of(model)
    graph_outputs = {o.name for o in model.graph.output}
    specs = {}
    for node in model.graph.node:
        if node.op_type not in TIMED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        in_dims = dims.get(node.input[0])
        if not in_dims or any(not isinstance(d, int) or d <= 0 for d in in_dims):
            continue
        if node.op_type == "Conv" and len(in_dims) < 3:
            continue
        if node.op_type == "Gemm" and (len(in_dims) != 2 or any(a.name == "transA" and a.i for a in node.attribute)):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "MatMul" and weight.ndim != 2:
            continue
        activation, act_inits = None, []
        after = readers.get(node.output[0], [])
        if node.op_type == "Conv" and len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS \
                and node.output[0] not in graph_outputs:
            extra = [i for i in after[0].input[1:] if i]
            if all(i in inits for i in extra):
                activation, act_inits = after[0], [inits[i] for i in extra]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        specs[node.name] = _LayerSpec(node, weight, has_bias, [int(d) for d in in_dims], activation, act_inits)
    return specs


def _uniform_counts(analysis, prunable: set[int], share: float) -> dict[int, int]:
    """Each prunable group at `share` of its channels, rounded down to its unit (never below its frozen)."""
    counts = {}
    for gid in prunable:
        group = analysis.groups[gid]
        unit = unit_for(group.size)
        k = max(unit, int(share * group.size) // unit * unit)
        counts[gid] = int(min(group.size, max(k, int(group.frozen.sum()), 1)))
    return counts


def slimmed_model(model: onnx.ModelProto, analysis, counts: dict[int, int]) -> onnx.ModelProto:
    """The model with each group cut to counts[g] channels (the lowest indices and the frozen ones kept:
    which channels stay does not change the speed)."""
    from onnx_prune.passes.allocate import select_top
    from onnx_prune.passes.plan import GroupPlan, Plan
    from onnx_prune.passes.rewrite import ApplyPlanPass

    plan = Plan()
    for gid, k in counts.items():
        group = analysis.groups[gid]
        if k < group.size:
            plan.groups[gid] = GroupPlan(select_top(-np.arange(group.size, dtype=float), group.frozen, k))
    return ApplyPlanPass(analysis, plan)(model).model


def measure_table(model: onnx.ModelProto, analysis, provider: str = "cpu", threads: int | None = None,
                  batch: int = 1, shapes: dict | None = None, repeat: int = 10, whole_repeat: int = 20,
                  groups: set[int] | None = None, progress: Callable[[str], None] | None = None,
                  calibration_share: float = 0.6) -> dict:
    """Time every layer a prunable group changes, at the widths `widths_to_measure` picks, and calibrate on
    the whole model (as it is and with every group at `calibration_share`).  Returns the table (JSON-able).
    `analysis` must be built from this very model (the prepared, normalised one)."""
    from .cost import concrete_shapes

    provider = provider_name(provider)
    start = time.perf_counter()
    prunable = set(groups) if groups is not None else {g.id for g in analysis.prunable_groups}
    dims = concrete_shapes(model, shapes, batch)
    opset = max(11, next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13))
    timer = _Timer(provider, threads, repeat, opset)
    nodes = {}
    specs = _layer_specs(model, dims)
    for position, (name, spec) in enumerate(specs.items()):
        node = spec.node
        out_terms = _width_terms(analysis, node.output[0], prunable)
        in_terms = _width_terms(analysis, node.input[0], prunable)
        if out_terms is None and in_terms is None:
            continue
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out_dims = dims.get(node.output[0])
            if not out_dims or any(not isinstance(d, int) for d in out_dims):
                continue
            out_spatial = tuple(int(d) for d in out_dims[2:])
            cout, cin = int(spec.weight.shape[0]), int(spec.input_dims[1])
            depthwise = group > 1 and spec.weight.shape[1] == 1 and group == cout
            if depthwise:
                terms = out_terms or in_terms
                ws = widths_to_measure(cout)
                ms = timer.measure([timer.conv_graph(spec, w, w, out_spatial) for w in ws])
                entry = {"op": "Conv", "kind": "same", "out": {"full": cout, "widths": ws, "ms": ms, "terms": terms}}
                entry["full_ms"] = ms[ws.index(cout)]
            elif group > 1:
                full_ms = timer.measure([timer.conv_graph(spec, cin, cout, out_spatial)])[0]
                entry = {"op": "Conv", "kind": "linear", "full_ms": full_ms,
                         "out": {"full": cout, "widths": [cout], "ms": [full_ms], "terms": out_terms or in_terms}}
            else:
                entry = {"op": "Conv", "kind": "dense"}
                full_ms = None
                if out_terms is not None:
                    ws = widths_to_measure(cout)
                    ms = timer.measure([timer.conv_graph(spec, cin, w, out_spatial) for w in ws])
                    entry["out"] = {"full": cout, "widths": ws, "ms": ms, "terms": out_terms}
                    full_ms = ms[ws.index(cout)]
                if in_terms is not None:
                    ws = widths_to_measure(cin)
                    ms = timer.measure([timer.conv_graph(spec, w, cout, out_spatial) for w in ws])
                    entry["in"] = {"full": cin, "widths": ws, "ms": ms, "terms": in_terms}
                    full_ms = ms[ws.index(cin)] if full_ms is None else full_ms
                entry["full_ms"] = full_ms
        else:
            k = int(spec.input_dims[-1])
            n = int(spec.weight.shape[0] if node.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in node.attribute) else spec.weight.shape[-1])
            entry = {"op": node.op_type, "kind": "dense"}
            full_ms = None
            if out_terms is not None:
                ws = widths_to_measure(n)
                ms = timer.measure([timer.dense_graph(spec, k, w) for w in ws])
                entry["out"] = {"full": n, "widths": ws, "ms": ms, "terms": out_terms}
                full_ms = ms[ws.index(n)]
            if in_terms is not None:
                ws = widths_to_measure(k)
                ms = timer.measure([timer.dense_graph(spec, w, n) for w in ws])
                entry["in"] = {"full": k, "widths": ws, "ms": ms, "terms": in_terms}
                full_ms = ms[ws.index(k)] if full_ms is None else full_ms
            entry["full_ms"] = full_ms
        nodes[name] = entry
        if progress is not None:
            progress(f"latency table: {position + 1}/{len(specs)} {name} {entry['full_ms']:.3f} ms "
                     f"({time.perf_counter() - start:.0f} s)")
    table = {"version": TABLE_VERSION, "nodes": nodes, "batch": int(batch), "provider": provider,
             "threads": threads, "repeat": repeat, "quantile": QUANTILE, "layers_timed": timer.measured,
             "clock": getattr(timer, "clock", "wall"),
             "calibration": {"fixed_ms": 0.0, "scale": 1.0, "points": []}}
    bare = LatencyModel(table)
    # the whole model as it is and uniformly slimmed, timed in the same interleaved rounds (both see the same load)
    shares = [1.0, calibration_share]
    counts_at = [{} if share == 1.0 else _uniform_counts(analysis, prunable, share) for share in shares]
    from .bench import _batch_feed
    from .sessions import load_graph_only

    feed = _batch_feed(load_graph_only(model), batch, 0, shapes)
    wholes = [model if not counts else slimmed_model(model, analysis, counts) for counts in counts_at]
    whole_timer = _Timer(provider, threads, whole_repeat, opset)
    measured = whole_timer.time_all([(whole, feed) for whole in wholes], warmup=3)
    points = []
    for share, counts, ms in zip(shares, counts_at, measured):
        points.append({"share": share, "counts": {str(g): k for g, k in sorted(counts.items())},
                       "measured_ms": ms, "layers_ms": bare.layers_ms(counts)})
        if progress is not None:
            progress(f"latency table: whole model at {share:.0%} of the channels: {ms:.2f} ms "
                     f"measured, layers sum {points[-1]['layers_ms']:.2f} ms")
    table["calibration"] = dict(calibrate(points), points=points)
    table["seconds"] = round(time.perf_counter() - start, 1)
    return table


def whole_model_ms(model: onnx.ModelProto, provider: str, threads: int | None, batch: int,
                   shapes: dict | None = None, repeat: int = 20) -> float:
    """The whole model's time with the estimator the layers use (QUANTILE of `repeat` runs)."""
    from .bench import _batch_feed
    from .sessions import load_graph_only

    return _timed_ms(model, _batch_feed(load_graph_only(model), batch, 0, shapes), provider, threads, repeat, warmup=3)


def calibrate(points: list[dict]) -> dict:
    """fixed + scale * layers through the measured points (two: as it is, uniformly slimmed).  A scale that
    comes out non-positive or a fixed part above the whole (noise, or layers that are not where the time
    goes) falls back to a scale alone through the first point."""
    (t0, s0), (t1, s1) = [(p["measured_ms"], p["layers_ms"]) for p in points[:2]]
    if abs(s0 - s1) > 1e-9:
        scale = (t0 - t1) / (s0 - s1)
        fixed = t0 - scale * s0
        if scale > 0 and 0 <= fixed <= t0:
            return {"fixed_ms": fixed, "scale": scale}
    return {"fixed_ms": 0.0, "scale": t0 / s0 if s0 > 0 else 1.0}


def load_or_measure(model: onnx.ModelProto, analysis, provider: str = "cpu", threads: int | None = None,
                    batch: int = 1, shapes: dict | None = None, table_file: str | os.PathLike | None = None,
                    use_cache: bool = True, progress: Callable[[str], None] | None = None,
                    **measure_options) -> LatencyModel:
    """The latency model for this model and runtime: from `table_file` when it exists (its key must match),
    else from the cache, else measured (then written to the cache and to `table_file` when given)."""
    key = cache_key(model_hash(model), provider, threads, batch, shapes)
    if table_file is not None and os.path.exists(table_file):
        try:
            table = json.loads(Path(table_file).read_text())
        except (OSError, ValueError) as err:
            raise PruneError(f"--latency-table {table_file}: not a latency table ({err})") from None
        stored = table.get("key", {})
        if stored.get("model_sha256") != key["model_sha256"]:
            raise PruneError(f"--latency-table {table_file} was measured on another model")
        different = [k for k in ("provider", "threads", "batch") if stored.get(k) != key[k]]
        if different:
            raise PruneError(f"--latency-table {table_file} was measured with other settings: "
                             + ", ".join(f"{k} {stored.get(k)} (now {key[k]})" for k in different))
        return LatencyModel(table)
    path = cache_path(key)
    table = None
    if use_cache and path.exists():
        try:
            table = json.loads(path.read_text())
            if table.get("key") != key:
                table = None
        except (OSError, ValueError):
            table = None  # a damaged cache entry is measured again
    if table is None:
        if provider_name(provider) != CPU:
            from .sessions import provider_problem

            problem = provider_problem(provider)
            if problem is not None:
                raise PruneError(f"cannot measure latency on {provider_name(provider)}: {problem}")
        table = measure_table(model, analysis, provider, threads, batch, shapes, progress=progress,
                              **measure_options)
        table["key"] = key
        if use_cache:
            _write_atomic(path, json.dumps(table, indent=1, sort_keys=True))
    if table_file is not None:
        _write_atomic(Path(table_file), json.dumps(table, indent=1, sort_keys=True))
    latency = LatencyModel(table)

    def persist(updated: dict) -> None:
        if use_cache:
            _write_atomic(path, json.dumps(updated, indent=1, sort_keys=True))
        if table_file is not None:
            _write_atomic(Path(table_file), json.dumps(updated, indent=1, sort_keys=True))

    latency.measure = lambda counts: measure_relative(model, analysis, counts, latency.original_ms, provider,
                                                      threads, batch, shapes)
    latency.persist = persist
    return latency


def measure_relative(model: onnx.ModelProto, analysis, counts: dict[int, int], original_ms: float, provider: str,
                     threads: int | None, batch: int, shapes: dict | None = None, repeat: int = 20) -> float:
    """The model slimmed to `counts`, timed in interleaved rounds with the original, as ms on the table's scale
    (original_ms times the measured ratio: drift between the table's run and this one cancels)."""
    from .bench import _batch_feed
    from .sessions import load_graph_only

    feed = _batch_feed(load_graph_only(model), batch, 0, shapes)
    opset = max(11, next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13))
    full, slim = _Timer(provider_name(provider), threads, repeat, opset).time_all(
        [(model, feed), (slimmed_model(model, analysis, counts), feed)], warmup=3)
    return original_ms * slim / full


def latency_record(original: onnx.ModelProto, analysis, pruned: onnx.ModelProto, plan, opts) -> dict:
    """For a latency target: the pruned model's measured latency as a share of the original's (both timed in
    alternation on the options' provider, threads and batch), next to the latency model's prediction."""
    from .bench import check_speedup

    latency = load_or_measure(original, analysis, opts.provider, opts.threads, opts.latency_batch,
                              table_file=opts.latency_table)
    counts = {gid: len(group_plan.keep) for gid, group_plan in plan.groups.items()}
    predicted = latency.predict(counts)
    check = check_speedup(original, pruned, opts.provider, opts.threads, opts.latency_batch, predicted_ms=predicted)
    return {"achieved": check.pruned_ms / check.original_ms, "predicted": predicted / latency.original_ms,
            "original_ms": check.original_ms, "pruned_ms": check.pruned_ms, "predicted_ms": predicted,
            "speed_check": check.to_dict()}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
