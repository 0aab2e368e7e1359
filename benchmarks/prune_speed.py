"""Pruning time against the cost of just reading and writing the same file.

    python benchmarks/prune_speed.py [--model models/zoo/resnet50_torchscript.onnx] [--ratio 0.5] [--repeat 3]
        [--criterion bnvar] [--profile 30]

Prints the median of each and their ratio; the target is well under 2x (issue: core pass, "Speed").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

import onnx_prune
from onnx_prune.runtime.io import save
from timing import median_time

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "zoo" / "resnet50_torchscript.onnx"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--criterion", default=None, help="channel criterion (default: prune's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timings, cProfile one prune and print its N costliest functions (cumulative)")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not model.exists():
        sys.exit(f"{model} not found: build it with  python models/build_zoo.py --models resnet50")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        io_time, _ = median_time(lambda: onnx.save(onnx.load(str(model)), str(out)), args.repeat)

        def prune_step():
            options = {"criterion": args.criterion} if args.criterion else {}
            pruned, _ = onnx_prune.prune(str(model), ratio=args.ratio, **options)
            save(pruned, out, input_path=model)

        prune_time, _ = median_time(prune_step, args.repeat)
    size_mb = model.stat().st_size / 1e6
    criterion = args.criterion or onnx_prune.PruneOptions().criterion
    print(f"model {model.name} ({size_mb:.0f} MB), ratio {args.ratio}, criterion {criterion}, median of {args.repeat}")
    print(f"onnx.load + onnx.save        {io_time:7.3f} s")
    print(f"load + prune + save          {prune_time:7.3f} s")
    print(f"ratio prune / (load+save)    {prune_time / io_time:7.2f}x   (target: well under 2x)")
    if args.profile:
        import cProfile
        import pstats

        options = {"criterion": args.criterion} if args.criterion else {}
        profiler = cProfile.Profile()
        profiler.runcall(onnx_prune.prune, str(model), ratio=args.ratio, progress=False, **options)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
