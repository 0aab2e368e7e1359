"""Latency with onnxruntime, and how much of the MAC reduction it turns into speed-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from .fidelity import make_inputs
from .sessions import ModelLike, available_providers, load_graph_only, make_session, provider_chain

__all__ = [
    "LatencyResult",
    "available_providers",  # lives in sessions; re-exported as part of the benchmarking API
    "EXIT_TOO_SLOW",
    "SpeedupCheck",
    "benchmark",
    "check_speedup",
    "compare_latency",
    "format_latency_table",
]

EXIT_TOO_SLOW = 4  # the CLI's exit status when --min-speedup is not met
SLOWER_BELOW = 0.98  # the default check warns below this speed-up: a few runs cannot resolve the last 2%
# ... and only when the pruned model is slower by at least this much: timer and scheduler jitter on a model
# that runs in a few microseconds (a 0.03 ms fixture read 0.93x on a busy machine) is not a slow-down
SLOWDOWN_RESOLUTION_MS = 0.02
QUICK_MIN_RUNS = 3  # a budgeted check (`check_speedup(budget_s=...)`) still times at least this many pairs


@dataclass(frozen=True)
class LatencyResult:
    provider: str
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int  # timed runs, warm-up excluded
    clock: str = "wall"  # "cpu": the thread's CPU time (one intra-op thread), see `run_clock`

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


def _batch_feed(model, batch: int, seed: int, shapes: dict[str, list[int]] | None) -> dict[str, np.ndarray]:
    feed = make_inputs(model, seed=seed, shapes=shapes, samples=1, batch=batch)[0]
    # A model whose inputs all have fixed leading dims only runs at that batch.
    if feed and all(array.ndim == 0 or array.shape[0] != batch for array in feed.values()):
        fixed = {name: list(array.shape) for name, array in feed.items()}
        raise ValueError(f"cannot run batch {batch}: no input has a dynamic leading dim (input shapes {fixed})")
    return feed


def run_clock(threads: int | None, provider: str = "cpu") -> tuple[str, Callable[[], float]]:
    """("cpu", time.thread_time) for a CPU session with one intra-op thread, else ("wall", time.perf_counter).

    With one thread onnxruntime computes in the calling thread, so that thread's CPU time is the run's time
    without the stretches other processes held the CPU: on a shared machine a wall clock stretches a run by
    every time slice it waits for, the longer the run the more, while the CPU time does not (cache and memory
    contention still show).  With several threads (or a GPU) only the wall clock tells the time."""
    from .sessions import CPU, provider_name

    if threads == 1 and provider_name(provider) == CPU:
        return "cpu", time.thread_time
    return "wall", time.perf_counter


def _timed_runs_ms(session, feed: dict[str, np.ndarray], warmup: int, repeat: int,
                   clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    for _ in range(warmup):
        session.run(None, feed)
    timings = np.empty(repeat)
    for index in range(repeat):
        start = clock()
        session.run(None, feed)
        timings[index] = clock() - start
    return timings * 1e3


def benchmark(
    model_or_path: ModelLike,
    providers: list[str] | None = None,
    batches: Iterable[int] = (1,),
    warmup: int = 5,
    repeat: int = 30,
    threads: int | None = None,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
    progress: Callable[[LatencyResult], None] | None = None,
) -> list[LatencyResult]:
    """Latency of `session.run` per usable provider and batch size, provider-major.

    Each provider in `available_providers(providers)` is measured on its own (with
    fallbacks for the nodes it cannot run: TensorRT -> CUDA -> CPU, CUDA -> CPU).
    Inputs are random (`fidelity.make_inputs`) with the leading dim set to each batch
    and other dynamic dims from `shapes`; timings include host-device copies. `threads`
    sets intra-op threads (None: onnxruntime's default; 1 on the CPU times the thread's CPU time, see
    `run_clock`). `progress` is called with each
    result as it completes. Raises ValueError for a batch the model cannot take.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    graph = load_graph_only(model_or_path)
    feeds = {batch: _batch_feed(graph, batch, seed, shapes) for batch in dict.fromkeys(batches)}
    results = []
    for provider in available_providers(providers):
        session = make_session(model_or_path, provider_chain(provider), threads)
        clock_name, clock = run_clock(threads, provider)
        for batch, feed in feeds.items():
            timings = _timed_runs_ms(session, feed, warmup, repeat, clock)
            result = LatencyResult(
                provider=provider,
                batch=batch,
                median_ms=float(np.median(timings)),
                p90_ms=float(np.percentile(timings, 90)),
                mean_ms=float(np.mean(timings)),
                runs=repeat,
                clock=clock_name,
            )
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def compare_latency(
    base_results: list[LatencyResult], pruned_results: list[LatencyResult], mac_reduction: float
) -> list[dict]:
    """One row per (provider, batch): medians, speed-up = base median / pruned median,
    mac_reduction = macs_before / macs_after (the theoretical speed-up, i.e.
    1 / cost_ratio(...)["macs"]["ratio"]) and efficiency = speed-up / mac_reduction, the
    share of the theoretical gain the runtime delivers. Raises ValueError when the two
    result lists do not cover the same (provider, batch) pairs.
    """
    pruned_by_key = {(result.provider, result.batch): result for result in pruned_results}
    base_keys = [(result.provider, result.batch) for result in base_results]
    if sorted(base_keys) != sorted(pruned_by_key):
        raise ValueError(f"base measured {sorted(base_keys)}, pruned measured {sorted(pruned_by_key)}")
    rows = []
    for base in base_results:
        pruned = pruned_by_key[(base.provider, base.batch)]
        speedup = base.median_ms / pruned.median_ms
        rows.append(
            {
                "provider": base.provider,
                "batch": base.batch,
                "base_median_ms": base.median_ms,
                "pruned_median_ms": pruned.median_ms,
                "base_p90_ms": base.p90_ms,
                "pruned_p90_ms": pruned.p90_ms,
                "speedup": speedup,
                "mac_reduction": mac_reduction,
                "efficiency": speedup / mac_reduction,
            }
        )
    return rows


def format_latency_table(rows: list[dict]) -> str:
    """Fixed-width table of `compare_latency` rows."""
    header = (
        f"{'provider':<10}  {'batch':>5}  {'base ms':>9}  {'pruned ms':>9}  "
        f"{'speed-up':>8}  {'MAC red.':>8}  {'efficiency':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        provider = row["provider"].removesuffix("ExecutionProvider")
        lines.append(
            f"{provider:<10}  {row['batch']:>5}  {row['base_median_ms']:>9.3f}  {row['pruned_median_ms']:>9.3f}  "
            f"{row['speedup']:>7.2f}x  {row['mac_reduction']:>7.2f}x  {row['efficiency']:>10.0%}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class SpeedupCheck:
    """Original against pruned on one provider, thread count and batch, timed in alternation."""
    provider: str
    batch: int
    threads: int | None
    original_ms: float  # medians of the alternating runs
    pruned_ms: float
    runs: int
    predicted_ms: float | None = None  # what the latency model predicted for the pruned model, when one was used
    clock: str = "wall"  # "cpu" with one CPU thread (`run_clock`)

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms if self.pruned_ms > 0 else float("inf")

    def summary(self) -> str:
        provider = self.provider.removesuffix("ExecutionProvider")
        predicted = f", predicted {self.predicted_ms:.2f} ms" if self.predicted_ms is not None else ""
        return (f"speed ({provider}, batch {self.batch}, {self.threads or 'default'} threads, {self.runs} runs "
                f"each{', CPU time' if self.clock == 'cpu' else ''}): original {self.original_ms:.2f} ms, pruned {self.pruned_ms:.2f} ms{predicted}, "
                f"speed-up {self.speedup:.2f}x")

    def verdict(self, min_speedup: float | None = None, slower_below: float = 1.0) -> tuple[str | None, int]:
        """(warning for stderr or None, exit status): a loud warning when the pruned model is slower than the
        original (speed-up below `slower_below`) or than `min_speedup`; status EXIT_TOO_SLOW only when
        `min_speedup` is given and missed."""
        if min_speedup is not None and self.speedup < min_speedup:
            return (f"onnx-prune: ERROR: speed-up {self.speedup:.2f}x is below --min-speedup {min_speedup:g} "
                    f"({self.summary()})", EXIT_TOO_SLOW)
        if self.speedup < slower_below and self.pruned_ms - self.original_ms >= SLOWDOWN_RESOLUTION_MS:
            return (f"onnx-prune: WARNING: the pruned model is SLOWER than the original ({self.summary()}); "
                    "try --round-to auto or 8, or --target-latency", 0)
        return None, 0

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup=self.speedup)


def check_speedup(
    original: ModelLike,
    pruned: ModelLike,
    provider: str = "cpu",
    threads: int | None = None,
    batch: int = 1,
    repeat: int = 20,
    warmup: int = 3,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
    predicted_ms: float | None = None,
    budget_s: float | None = None,
) -> SpeedupCheck:
    """Time `original` and `pruned` on `provider` (falling back to CPU with a notice when it cannot run here),
    alternating one run of each so that both see the same load, and compare their medians.

    Both get the same random inputs (`seed`; dynamic dims from `shapes`, the leading one = `batch`).  With
    `budget_s`, warm-up stops once it has used half of that many seconds, and the timed pairs are as many as fit
    the budget by the last warm-up pair's time, at least QUICK_MIN_RUNS and at most `repeat`: a quick check
    whose cost stays near the budget on big models.
    Raises ValueError for a batch the models cannot take or repeat < 1.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    chosen = available_providers([provider])[0]
    feed = _batch_feed(load_graph_only(original), batch, seed, shapes)
    sessions = [make_session(model, provider_chain(chosen), threads) for model in (original, pruned)]
    pair_s = warm_s = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for session in sessions:
            session.run(None, feed)
        pair_s = time.perf_counter() - start
        warm_s += pair_s
        if budget_s is not None and warm_s >= budget_s / 2:  # a big model: its first runs already cost enough
            break
    if budget_s is not None:
        repeat = max(min(QUICK_MIN_RUNS, repeat), min(repeat, int(budget_s / pair_s) if pair_s > 0 else repeat))
    clock_name, clock = run_clock(threads, chosen)
    timings = np.empty((2, repeat))
    for index in range(repeat):
        order = (0, 1) if index % 2 == 0 else (1, 0)  # alternate who goes first: neither always follows the other
        for which in order:
            start = clock()
            sessions[which].run(None, feed)
            timings[which, index] = clock() - start
    original_ms, pruned_ms = (float(np.median(row)) * 1e3 for row in timings)
    return SpeedupCheck(chosen, batch, threads, original_ms, pruned_ms, repeat, predicted_ms, clock_name)
