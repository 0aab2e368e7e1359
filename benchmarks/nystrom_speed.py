"""Similarity selection time: exact pairwise cosine matrix against the Nystrom approximation.

    python benchmarks/nystrom_speed.py [--filters 256,1024,4096] [--in-channels 256] [--landmarks 9] [--repeat 5]

Random 3x3 conv layers (prototype rank <= 9, so 9 landmarks are exact).  Both paths start from the same
rank-1 prototypes (computed once, not timed) and end with every filter's nearest neighbour and distance;
the kept sets are checked to be identical.  The paper reports about 3x.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from onnx_prune.analysis.criteria import FilterSet, nearest_exact, nearest_nystrom, prototypes
from timing import median_time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", default="256,1024,4096")
    parser.add_argument("--in-channels", type=int, default=256)
    parser.add_argument("--landmarks", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print("| filters | exact (s) | Nystrom (s) | exact / Nystrom | same neighbours |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.filters.split(",")]:
        rows = np.random.default_rng(n).standard_normal((n, args.in_channels * 9))
        filters = FilterSet("conv", "producer", np.column_stack([rows, np.zeros(n)]), np.arange(n), np.arange(n), 9)
        proto = prototypes(filters)
        exact_s, (exact_nb, _) = median_time(lambda: nearest_exact(proto), args.repeat)
        approx_s, (approx_nb, _) = median_time(lambda: nearest_nystrom(proto, args.landmarks), args.repeat)
        print(f"| {n} | {exact_s:.4f} | {approx_s:.4f} | {exact_s / approx_s:.1f}x | "
              f"{'yes' if np.array_equal(exact_nb, approx_nb) else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
