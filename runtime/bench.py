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
    "benchmark",
    "compare_latency",
    "format_latency_table",
]


@dataclass(frozen=True)
class LatencyResult:
    provider: str
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int  # timed runs, warm-up excluded

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


def _timed_runs_ms(session, feed: dict[str, np.ndarray], warmup: int, repeat: int) -> np.ndarray:
    for _ in range(warmup):
        session.run(None, feed)
    timings = np.empty(repeat)
    for index in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        timings[index] = time.perf_counter() - start
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
    sets intra-op threads (None: onnxruntime's default). `progress` is called with each
    result as it completes. Raises ValueError for a batch the model cannot take.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    graph = load_graph_only(model_or_path)
    feeds = {batch: _batch_feed(graph, batch, seed, shapes) for batch in dict.fromkeys(batches)}
    results = []
    for provider in available_providers(providers):
        session = make_session(model_or_path, provider_chain(provider), threads)
        for batch, feed in feeds.items():
            timings = _timed_runs_ms(session, feed, warmup, repeat)
            result = LatencyResult(
                provider=provider,
                batch=batch,
                median_ms=float(np.median(timings)),
                p90_ms=float(np.percentile(timings, 90)),
                mean_ms=float(np.mean(timings)),
                runs=repeat,
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
