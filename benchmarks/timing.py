"""The one timing helper the benchmark scripts share."""
from __future__ import annotations

import statistics
import time


def median_time(step, repeat: int) -> tuple[float, object]:
    """(median seconds over `repeat` calls of `step`, the last call's result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
