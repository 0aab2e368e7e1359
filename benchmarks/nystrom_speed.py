"""Similarity selection time: exact pairwise cosine matrix against the Nystrom approximation.

    python benchmarks/nystrom_speed.py [--filters 256,1024,4096] [--in-channels 128,256] [--kernels 3,1]
                                       [--landmarks auto,9] [--repeat 3]

Random k x k conv layers: 3x3 prototypes have rank <= 9 (9 landmarks are exact), 1x1 prototypes are whole
rows of rank C_in.  Both paths start from the same prototypes (computed once, not timed) and end with every
filter's nearest neighbour and distance.  "auto" is the default: as many landmarks as the prototypes' rank.
The table gives the share of filters whose neighbour matches the exact one.  Times are CPU seconds of this
process (all its threads; median of --repeat), so that a machine shared with other jobs still gives comparable
figures; run with OPENBLAS_NUM_THREADS=1 for single-thread figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from onnx_prune.analysis.criteria import FilterSet, nearest_exact, nystrom_neighbours, prototypes


def median_time(step, repeat: int) -> tuple[float, object]:
    """(median CPU seconds over `repeat` calls of `step`, the last call's result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = step()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", default="256,1024,4096")
    parser.add_argument("--in-channels", default="128,256")
    parser.add_argument("--kernels", default="3,1", help="kernel sides, e.g. 3,1")
    parser.add_argument("--landmarks", default="auto,9")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print("| kernel | filters | C_in | rank | landmarks | exact (CPU s) | Nystrom (CPU s) | exact / Nystrom | "
          "neighbours as exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in [int(k) for k in args.kernels.split(",")]:
        for c_in in [int(c) for c in args.in_channels.split(",")]:
            for n in [int(x) for x in args.filters.split(",")]:
                rows = np.random.default_rng(n + c_in).standard_normal((n, c_in * side * side))
                filters = FilterSet("conv", "producer", np.column_stack([rows, np.zeros(n)]), np.arange(n),
                                    np.arange(n), side * side)
                proto = prototypes(filters)
                exact_s, (exact_nb, _) = median_time(lambda: nearest_exact(proto), args.repeat)
                for spec in args.landmarks.split(","):
                    landmarks = None if spec == "auto" else int(spec)
                    approx_s, fit = median_time(lambda: nystrom_neighbours(proto, landmarks), args.repeat)
                    print(f"| {side}x{side} | {n} | {c_in} | {fit.rank} | {fit.landmarks} ({spec}) | "
                          f"{exact_s:.4f} | {approx_s:.4f} | {exact_s / approx_s:.1f}x | "
                          f"{np.mean(fit.neighbour == exact_nb):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
