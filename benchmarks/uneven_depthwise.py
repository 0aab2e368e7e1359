"""Uneven depthwise separation on onnxruntime CPU: where do fewer MACs give lower latency?

    python benchmarks/uneven_depthwise.py [--repeat 50]

No conv of the zoo or trained models has few enough distinct kernels per input channel for the rewrite to
save MACs (see results/red_table.md), so this measures synthetic 3x3 convs (ResNet stage shapes) whose
input channel c holds u distinct kernels: `SeparateDepthwisePass` decides on each, and the table gives
MACs and the isolated batch-1 latencies it measured.  Writes ``benchmarks/results/uneven_depthwise.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.passes.uneven_depthwise import SeparateDepthwisePass

RESULTS = Path(__file__).resolve().parent / "results" / "uneven_depthwise.md"
SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels in = out, spatial size)
DISTINCT = (1, 2, 4, 8)


def repeating_conv(channels: int, hw: int, distinct: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((channels, distinct, 3, 3)).astype(np.float32)
    weight = bank[np.arange(channels)[None, :], rng.integers(0, distinct, (channels, channels))]
    node = helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, hw, hw])
    graph = helper.make_graph([node], "conv", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    separate = SeparateDepthwisePass(measure_latency=True, repeat=args.repeat)
    lines = [f"# Uneven depthwise separation, 3x3 convs, batch 1, onnxruntime CPU ({os.cpu_count()} CPUs, load "
             f"average {os.getloadavg()[0]:.1f})", "",
             "| channels | spatial | distinct kernels / channel | S | MACs before | MACs after | latency before ms "
             "| after ms | applied |", "|---|---|---|---|---|---|---|---|---|"]
    for channels, hw in SHAPES:
        for distinct in DISTINCT:
            d = separate(repeating_conv(channels, hw, distinct)).details["decisions"][0]
            latency = [f"{v:.3f}" if v is not None else "-" for v in (d["latency_before_ms"], d["latency_after_ms"])]
            lines.append(f"| {channels} | {hw} | {distinct} | {d['distinct']} | {d['macs_before']} | "
                         f"{d['macs_after']} | {latency[0]} | {latency[1]} | "
                         f"{'yes' if d['applied'] else 'no: ' + d['reason']} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
