"""Cost of the tool itself: analysis + prune time and peak memory against graph size.

Generated models (random weights, no torch needed):
- plain CNNs of N 3x3 convs (16 -> 16 channels on 8x8 maps, ReLU after each), N in --sizes;
- residual CNNs of N convs (pairs of convs with an Add around them, like ResNet's basic blocks);
- one model over 2 GB of weights stored as external data (wide 3x3 convs on 4x4 maps).

Each measurement runs in its own process (so that its peak memory is its own): load, prepare (normalise +
channel analysis), prune (scores, allocation, rewrite) and save, with the time of each step and the peak
resident memory (``ru_maxrss``) beside the RSS right after the imports.  The fitted exponent b of
time = a * N^b over the sizes says whether the tool scales linearly (b ~ 1).  With ``--profile`` the
largest plain model's prune runs under cProfile and the top functions by cumulative time are printed.

    python benchmarks/tool_cost.py [--sizes 50,500,5000] [--big-gb 2.1] [--no-big] [--ratio 0.3]
        [--profile] [--out benchmarks/results/tool_cost.json]

Timings depend on the machine and on what else runs: the run records the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent


# --- generated models -------------------------------------------------------------------------------------


def cnn(n_convs: int, residual: bool, channels: int = 16, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """N 3x3 convs (channels -> channels) with ReLU; residual: every second conv's output adds the block input."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    stem = numpy_helper.from_array(rng.standard_normal([channels, 3, 3, 3]).astype(np.float32) * 0.1, "stem_w")
    inits.append(stem)
    nodes.append(helper.make_node("Conv", ["x", "stem_w"], ["s"], name="stem", pads=[1] * 4))
    current, block_input = "s", "s"
    for index in range(n_convs - 1):
        w = numpy_helper.from_array(rng.standard_normal([channels, channels, 3, 3]).astype(np.float32) * 0.1,
                                    f"w{index}")
        b = numpy_helper.from_array(rng.standard_normal([channels]).astype(np.float32) * 0.1, f"b{index}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [current, w.name, b.name], [f"c{index}"], name=f"conv{index}",
                                      pads=[1] * 4))
        out = f"c{index}"
        if residual and index % 2 == 1:
            nodes.append(helper.make_node("Add", [out, block_input], [f"a{index}"], name=f"add{index}"))
            out = f"a{index}"
        nodes.append(helper.make_node("Relu", [out], [f"r{index}"], name=f"relu{index}"))
        current = f"r{index}"
        if residual and index % 2 == 1:
            block_input = current
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["p"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flatten"))
    fc = numpy_helper.from_array(rng.standard_normal([10, channels]).astype(np.float32), "fc_w")
    inits.append(fc)
    nodes.append(helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, f"{'residual' if residual else 'plain'}_{n_convs}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_big_cnn(path: Path, gigabytes: float, channels: int = 1024, seed: int = 0) -> None:
    """Wide 3x3 convs (channels -> channels, 4x4 maps) until the weights pass `gigabytes` (1e9 bytes), written
    straight to `path` + ".data" one tensor at a time (the model never sits in memory whole)."""
    rng = np.random.default_rng(seed)
    per_conv = channels * channels * 9 * 4
    n = int(np.ceil(gigabytes * 1e9 / per_conv))
    data_name = path.name + ".data"
    nodes, inits = [], []

    def external(name: str, array: np.ndarray, data) -> TensorProto:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(data.tell())), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        data.write(array.tobytes())
        return tensor

    with open(path.parent / data_name, "wb") as data:
        inits.append(external("stem_w", rng.standard_normal([channels, 3, 3, 3], dtype=np.float32), data))
        nodes.append(helper.make_node("Conv", ["x", "stem_w"], ["s"], name="stem", pads=[1] * 4))
        current = "s"
        for index in range(n):
            w = rng.standard_normal([channels, channels, 3, 3], dtype=np.float32)
            w *= 0.01
            inits.append(external(f"w{index}", w, data))
            nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}",
                                          pads=[1] * 4))
            nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"], name=f"relu{index}"))
            current = f"r{index}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["y"], name="pool"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 1, 1])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def write_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# --- one measurement, in its own process -------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(path: str, ratio: float, profile: bool) -> dict:
    """Load, prepare, prune, save one model; times per step and peak memory (this process only)."""
    import onnx_prune
    from onnx_prune.runtime.io import load, save

    baseline_mb = _rss_mb()
    times = {}
    t0 = time.perf_counter()
    loaded = load(path)
    times["load"] = time.perf_counter() - t0
    rss = {"load": _rss_mb()}
    t0 = time.perf_counter()
    prepared = onnx_prune.prepare(loaded.model)
    times["prepare"] = time.perf_counter() - t0
    rss["prepare"] = _rss_mb()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    pruned, report = onnx_prune.prune(prepared, ratio=ratio)
    times["prune"] = time.perf_counter() - t0
    rss["prune"] = _rss_mb()
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save(pruned, Path(tmp) / "out.onnx", input_path=path)
        times["save"] = time.perf_counter() - t0
        rss["save"] = _rss_mb()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"times": times, "analysis_and_prune_s": times["prepare"] + times["prune"],
            "total_s": sum(times.values()), "peak_rss_mb": peak_mb, "rss_after_imports_mb": baseline_mb,
            "rss_after_mb": rss,
            "groups": len(prepared.analysis.groups), "nodes": len(loaded.model.graph.node),
            "channels_before": report.channels_before, "channels_after": report.channels_after}


def measure(path: Path, ratio: float, profile: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(path), "--ratio", str(ratio)]
                         + (["--profile"] if profile else []), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed on {path}:\n{out.stderr[-3000:]}")
    if profile:
        print(out.stderr, file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    """b in seconds = a * size^b, least squares on logs."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50,500,5000", help="comma-separated conv counts ('' for none: the big model only)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--big-gb", type=float, default=2.1, help="weights of the external-data model, in GB (1e9 B)")
    p.add_argument("--no-big", action="store_true", help="skip the model over 2 GB")
    p.add_argument("--profile", action="store_true", help="cProfile the largest plain model's prune")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tool_cost.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ratio, args.profile)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tool_cost_") as tmp:
        for kind in ("plain", "residual"):
            for n in sizes:
                path = Path(tmp) / f"{kind}_{n}.onnx"
                write_model(cnn(n, kind == "residual"), path, external=False)
                result = measure(path, args.ratio, profile=args.profile and kind == "plain" and n == max(sizes))
                result.update(kind=kind, convs=n, model_mb=path.stat().st_size / 1e6)
                rows.append(result)
                print(f"{kind:8s} {n:5d} convs  {result['model_mb']:7.1f} MB  prepare {result['times']['prepare']:7.2f} s"
                      f"  prune {result['times']['prune']:7.2f} s  total {result['total_s']:7.2f} s  peak RSS "
                      f"{result['peak_rss_mb']:7.0f} MB", file=sys.stderr, flush=True)
                path.unlink()
        big = None
        if not args.no_big:
            path = Path(tmp) / "big.onnx"
            t0 = time.perf_counter()
            write_big_cnn(path, args.big_gb)
            generate_s = time.perf_counter() - t0
            size_mb = (path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size) / 1e6
            big = measure(path, args.ratio)
            big.update(kind="external data", model_mb=size_mb, generate_s=generate_s)
            print(f"big      {big['nodes']:5d} nodes {size_mb:7.0f} MB  load {big['times']['load']:.1f} s  prepare "
                  f"{big['times']['prepare']:.1f} s  prune {big['times']['prune']:.1f} s  save {big['times']['save']:.1f} s"
                  f"  peak RSS {big['peak_rss_mb']:.0f} MB ({big['peak_rss_mb'] / size_mb:.2f}x the model); RSS after "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in big["rss_after_mb"].items()),
                  file=sys.stderr, flush=True)
    exponents = {}
    for kind in ("plain", "residual") if len(sizes) > 1 else ():
        mine = [r for r in rows if r["kind"] == kind]
        exponents[kind] = {
            "analysis_and_prune": fitted_exponent([r["convs"] for r in mine], [r["analysis_and_prune_s"] for r in mine]),
            "total": fitted_exponent([r["convs"] for r in mine], [r["total_s"] for r in mine]),
            "peak_rss_above_imports": fitted_exponent(
                [r["convs"] for r in mine], [max(r["peak_rss_mb"] - r["rss_after_imports_mb"], 1.0) for r in mine]),
        }
    lines = ["| model | convs | file MB | load s | prepare s | prune s | save s | peak RSS MB | peak / model | "
             "(peak - imports) / model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows + ([big] if big else []):
        t = r["times"]
        above = r["peak_rss_mb"] - r["rss_after_imports_mb"]  # the imports' own memory is not the model's
        lines.append(f"| {r['kind']} | {r.get('convs', r['nodes'])} | {r['model_mb']:.1f} | {t['load']:.2f} | "
                     f"{t['prepare']:.2f} | {t['prune']:.2f} | {t['save']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / r['model_mb']:.2f} | {above / r['model_mb']:.2f} |")
    lines.append("")
    for kind, e in exponents.items():
        lines.append(f"{kind}: time ~ N^{e['analysis_and_prune']:.2f} (analysis + prune), N^{e['total']:.2f} "
                     f"(with load and save); peak memory above the imports ~ N^{e['peak_rss_above_imports']:.2f}")
    load_after = os.getloadavg()
    lines.append(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
                 f"({os.cpu_count()} CPUs): {'timings taken under load' if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else 'quiet'}")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started, "command": " ".join(["python", *sys.argv]),
                                    "rows": rows, "big": big, "exponents": exponents, "ratio": args.ratio,
                                    "load_average_before": load_before, "load_average_after": load_after,
                                    "table_markdown": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
