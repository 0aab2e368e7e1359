"""Latency of pruned zoo models against the originals: how much of the MAC reduction onnxruntime delivers.

For each model, ratio and round-to, the model is pruned with the l2 criterion and timed with
onnxruntime (CPU; CUDA as well with ``--provider cuda`` when it really works here) next to the
original, which is timed once per model.  The table gives, per batch size, the median latency,
the speed-up over the original and the efficiency = speed-up / MAC reduction.

Writes ``<out-dir>/latency_<provider>.md`` (the table, also printed on stdout) and
``<out-dir>/latency_<provider>.json`` (raw numbers, machine, versions, command line) for each
provider measured.  Progress goes to stderr, one line per measurement.  ``--round-to-study`` instead writes
``<out-dir>/latency_round_to_cpu[_b<batch>].md/.json``: per model, ratio and round-to, the pruned model timed in
alternation with its original (speed-up, MAC reduction, and per round-to the slowest case and medians).

Timings on a small machine are only meaningful while nothing else runs.  Each measurement
therefore records the share of CPU time other processes used meanwhile (from /proc/stat); a
measurement that saw more than 10 % is taken again after waiting for the machine to become
quiet (``--retries``, ``--quiet-wait``, ``--retry-budget``; the least disturbed attempt is
kept), and measurements still disturbed are named under the table.

Usage::

    python benchmarks/latency_table.py [--models resnet50,mobilenet_v2] [--ratios 0.25,0.5,0.75]
        [--round-to 1,8,size,auto] [--target-latency 0.7,0.5] [--mac-round-to 8] [--batch 1,8] [--provider cpu|cuda] [--threads N]
        [--warmup 10] [--repeat 100] [--retries 2] [--quiet-wait 60] [--retry-budget 300] [--seed 0]
        [--out-dir benchmarks/results]

Needs the zoo (``python models/build_zoo.py --models resnet50,mobilenet_v2 --exporters torchscript``).
Everything but the timings is deterministic: pruning (l2 scores, ties by channel index) and
the random inputs (``--seed``) are the same on every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import onnx_prune
from onnx_prune.pipeline import make_plan
from onnx_prune.runtime.bench import benchmark, compare_latency
from onnx_prune.runtime.sessions import CPU, CUDA, available_providers, runtime_versions
from onnx_prune.runtime.latency_model import cpu_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ZOO = REPO / "models" / "zoo"
DEFAULT_OUT = REPO / "benchmarks" / "results"
CRITERION = "l2"
OTHER_LOAD_LIMIT = 0.10  # a measurement during which other processes used more of the CPU is flagged
SHORT = {CPU: "cpu", CUDA: "cuda"}


# --- options ---------------------------------------------------------------------------------


def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return list(dict.fromkeys(values))  # drop repeats, keep order
    return parse


def _round_to(text: str):
    return text if text in ("auto", "size") else int(text)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prune zoo models at several ratios and compare their onnxruntime latency with the original.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=_list(str), default=["resnet50", "mobilenet_v2"],
                   help="comma-separated zoo model names")
    p.add_argument("--exporter", default="torchscript", help="zoo export to use: models/zoo/<model>_<exporter>.onnx")
    p.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="zoo directory")
    p.add_argument("--ratios", type=_list(float), default=[0.25, 0.5, 0.75],
                   help="comma-separated pruning ratios (share of each group's channels removed)")
    p.add_argument("--round-to", type=_list(_round_to), default=[1, 8, "size"],
                   help="comma-separated round-to values (integers; size: the default per-group rule; auto: the latency "
                        "table's fastest widths)")
    p.add_argument("--target-latency", type=_list(float), default=[],
                   help="comma-separated latency targets (fraction of the original's measured latency): one row per "
                        "model, batch and target, next to MAC-targeted pruning at the same predicted latency")
    p.add_argument("--round-to-study", action="store_true",
                   help="instead of the table: per model, ratio and round-to, the speed-up over the original at the "
                        "first --batch, original and pruned timed in alternation (check_speedup); says which "
                        "round-to leaves no model slower than its original")
    p.add_argument("--targets-only", action="store_true",
                   help="only the --target-latency rows (no ratio x round-to table)")
    p.add_argument("--mac-round-to", type=_round_to, default=8,
                   help="round-to of the MAC-targeted rows the latency targets are compared with")
    p.add_argument("--batch", type=_list(int), default=[1, 8], help="comma-separated batch sizes")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: CPU only; cuda: CPU and, when it really works here, CUDA (else a notice and CPU only)")
    p.add_argument("--threads", type=int, default=_default_threads(),
                   help="onnxruntime intra-op threads; the default is the number of CPUs this process may use")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model and batch")
    p.add_argument("--repeat", type=int, default=100, help="timed runs per model and batch (median reported)")
    p.add_argument("--retries", type=int, default=2,
                   help="take a measurement again up to this many times when other processes used more than "
                        f"{100 * OTHER_LOAD_LIMIT:.0f}%% of the CPU meanwhile (the least disturbed attempt is kept)")
    p.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                   help="before such a retry, wait up to this long for the machine to become quiet")
    p.add_argument("--retry-budget", type=float, default=300.0, metavar="SECONDS",
                   help="total time the whole run may spend on retries and waiting for quiet")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs (and passed to prune)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where latency_<provider>.md/.json go")
    args = p.parse_args(argv)
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            p.error(f"--ratios: each ratio must be in (0, 1), got {ratio}")
    if any(r not in ("auto", "size") and r < 1 for r in args.round_to):
        p.error(f"--round-to: values must be positive integers, size or auto, got {args.round_to}")
    if any(not 0.0 < f <= 1.0 for f in args.target_latency):
        p.error(f"--target-latency: each fraction must be in (0, 1], got {args.target_latency}")
    for name, values in (("--batch", args.batch),):
        if min(values) < 1:
            p.error(f"{name}: values must be positive integers, got {values}")
    for name in ("threads", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if min(args.warmup, args.retries, args.quiet_wait, args.retry_budget) < 0:
        p.error("--warmup, --retries, --quiet-wait and --retry-budget must be non-negative")
    return args


# --- machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    return cpu_name() or "unknown CPU"


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _git(*args: str) -> str | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read only: never take the index lock
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, env=env,
                              timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """Commit and the files that differ from it (the numbers are for this working tree)."""
    head = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip() if head else None,
            "changed_files": sorted(line[3:] for line in changed.splitlines()) if changed is not None else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class CpuWatch:
    """Share of the machine's CPU time that other processes used between two calls (Linux /proc).

    Timings on a small machine are only meaningful when nothing else runs; this tells afterwards
    which measurements were disturbed.  None where /proc is unavailable.
    """

    def __init__(self) -> None:
        self.last = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state is field 3
            busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal minus idle and iowait
            return sum(fields[:8]), busy, int(own[11]) + int(own[12])  # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            return None

    def other_share(self) -> float | None:
        now, before = self._snapshot(), self.last
        self.last = now
        if now is None or before is None or now[0] <= before[0]:
            return None
        return max(0.0, (now[1] - before[1]) - (now[2] - before[2])) / (now[0] - before[0])


def machine_info(threads: int, providers: list[str]) -> dict:
    versions = runtime_versions()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": _default_threads(),
        "threads": threads,
        "onnxruntime": versions["onnxruntime"],
        "versions": versions,
        "hostname": platform.node(),
    }
    if CUDA in providers:
        info["gpu"] = gpu_name()
    return info


def machine_line(machine: dict, provider: str) -> str:
    line = (f"{machine['cpu_model']}, {machine['cpu_count']} cores, onnxruntime {machine['onnxruntime']}, "
            f"{machine['threads']} intra-op threads")
    if provider == CUDA:
        line += f", GPU {machine.get('gpu') or 'unknown'}"
    return line


# --- formatting ------------------------------------------------------------------------------


def _ratio_text(ratio: float) -> str:
    return f"{ratio:g}"


def markdown_table(records: list[dict], batches: list[int], provider: str) -> str:
    header = ["model", "ratio", "round-to", "MAC reduction", "params kept"]
    for batch in batches:
        header += [f"b{batch} median ms", f"b{batch} speed-up", f"b{batch} efficiency"]
    align = ["---", "---:", "---:", "---:", "---:"] + ["---:"] * (3 * len(batches))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for record in records:
        latency = {r["batch"]: r for r in record["latency"][provider]}
        if record["ratio"] == 0:
            cells = [record["model"], "0 (original)", "–", "1.00x", "100.0%"]
            for batch in batches:
                cells += [f"{latency[batch]['median_ms']:.2f}", "1.00x", "–"]
        else:
            compared = {row["batch"]: row for row in record["comparison"][provider]}
            cells = [record["model"], _ratio_text(record["ratio"]), str(record["round_to"]),
                     f"{record['mac_reduction']:.2f}x", f"{100 * record['params_kept']:.1f}%"]
            for batch in batches:
                row = compared[batch]
                cells += [f"{row['pruned_median_ms']:.2f}", f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(table: str, machine: dict, provider: str, args: argparse.Namespace, command: str,
                    started: str, seconds: float, disturbed: list[str], load_known: bool) -> str:
    if not load_known:
        warning = "The CPU use of other processes could not be measured here (no /proc/stat)."
    elif disturbed:
        warning = (f"**Warning:** other processes used more than {OTHER_LOAD_LIMIT:.0%} of the CPU during "
                   f"{len(disturbed)} measurement(s): {'; '.join(disturbed)}. Those numbers are not reliable.")
    else:
        warning = f"Other processes used less than {OTHER_LOAD_LIMIT:.0%} of the CPU during every measurement."
    return "\n".join([
        f"# Latency of pruned models ({SHORT[provider].upper()}, onnxruntime)",
        "",
        f"Machine: {machine_line(machine, provider)}",
        "",
        f"Settings: {args.exporter} exports, criterion {CRITERION}, warm-up {args.warmup}, "
        f"{args.repeat} timed runs per model and batch (median and speed-up from those), seed {args.seed}; "
        f"run {started}, {seconds:.0f} s in all.",
        "",
        f"Command: `{command}`",
        "",
        table,
        "",
        "MAC reduction = MACs before / MACs after; params kept = params after / params before; "
        "speed-up = original median / pruned median at the same batch; efficiency = speed-up / MAC reduction "
        "(1.00 = the runtime turns the whole theoretical gain into speed). The original is timed once per model"
        + (f"; a measurement is taken again (up to {args.retries} more time(s)) when other processes disturbed "
           "it, and the least disturbed attempt is kept." if args.retries else "."),
        "",
        warning,
        "",
    ])


# --- latency targets -----------------------------------------------------------------------


def _predicted_ms(latency, plan) -> float:
    return latency.predict({gid: len(group_plan.keep) for gid, group_plan in plan.groups.items()})


def mac_target_at(prepared, latency, goal_ms: float, round_to, seed: int) -> float:
    """The MAC target whose plan (l2, uniform, `round_to`) the latency model predicts to take `goal_ms`
    (bisection; predicted latency falls as the MAC target falls)."""
    lo, hi = 0.02, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        plan, _ = make_plan(prepared, target_macs=mid, criterion=CRITERION, round_to=round_to, seed=seed)
        if _predicted_ms(latency, plan) > goal_ms:
            hi = mid
        else:
            lo = mid
    return lo


def latency_target_rows(model: str, path: Path, prepared, batch: int, args, provider: str = CPU) -> list[dict]:
    """Per latency target: prune for it, and for the MAC target the latency model says takes as long; time
    both against the original in alternation (check_speedup) at this batch."""
    from onnx_prune.runtime.bench import check_speedup
    from onnx_prune.runtime.latency_model import load_or_measure

    progress = (lambda line: print("      " + line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    latency = load_or_measure(prepared.model, prepared.analysis, provider, args.threads, batch, progress=progress)
    table_s = time.perf_counter() - t0
    rows = []
    for fraction in args.target_latency:
        t0 = time.perf_counter()
        pruned, report = onnx_prune.prune(prepared, target_latency=fraction, criterion=CRITERION, seed=args.seed,
                                          threads=args.threads, latency_batch=batch, provider=provider)
        prune_s = time.perf_counter() - t0
        predicted = report.details["target"]["predicted_ms"]
        mac_target = mac_target_at(prepared, latency, predicted, args.mac_round_to, args.seed)
        mac_pruned, mac_report = onnx_prune.prune(prepared, target_macs=mac_target, criterion=CRITERION,
                                                  round_to=args.mac_round_to, seed=args.seed)
        mac_plan, _ = make_plan(prepared, target_macs=mac_target, criterion=CRITERION,
                                           round_to=args.mac_round_to, seed=args.seed)
        checks = {}
        for label, candidate in (("latency", pruned), ("macs", mac_pruned)):
            checks[label] = check_speedup(path, candidate, provider, args.threads, batch, repeat=args.repeat,
                                          warmup=args.warmup, seed=args.seed)
        row = {"model": model, "provider": provider, "batch": batch, "target": fraction, "table_seconds": round(table_s, 1),
               "prune_seconds": round(prune_s, 1), "predicted_ms": predicted,
               "predicted_fraction": predicted / latency.original_ms, "table_original_ms": latency.original_ms,
               "achieved": checks["latency"].pruned_ms / checks["latency"].original_ms,
               "macs_kept": report.macs_after / report.macs_before,
               "params_kept": report.params_after / report.params_before,
               "mac_target": mac_target, "mac_round_to": args.mac_round_to,
               "mac_predicted_fraction": _predicted_ms(latency, mac_plan) / latency.original_ms,
               "mac_achieved": checks["macs"].pruned_ms / checks["macs"].original_ms,
               "mac_macs_kept": mac_report.macs_after / mac_report.macs_before,
               "mac_params_kept": mac_report.params_after / mac_report.params_before,
               "checks": {k: c.to_dict() for k, c in checks.items()}, "load_average": load_average()}
        rows.append(row)
        print(f"      {model} b{batch} target {fraction:g}: achieved {row['achieved']:.3f} (predicted "
              f"{row['predicted_fraction']:.3f}), MACs kept {row['macs_kept']:.3f}; MAC-targeted "
              f"{mac_target:.3f}: achieved {row['mac_achieved']:.3f}, MACs kept {row['mac_macs_kept']:.3f}",
              file=sys.stderr, flush=True)
    return rows


def latency_target_markdown(rows: list[dict], args) -> str:
    lines = ["## Latency targets", "",
             "Latency-targeted pruning (`--target-latency F`, round-to auto) against MAC-targeted pruning "
             f"(`--target-macs`, round-to {args.mac_round_to}) at the MAC target the latency model predicts to take "
             "as long. Achieved = pruned / original median latency, the two timed in alternation "
             f"({args.repeat} runs each) at that batch; within 10% = |achieved / target - 1| <= 0.1.", "",
             "| model | batch | target | predicted | achieved | within 10% | MACs kept | params kept | "
             "MAC target | its achieved latency | its MACs kept | its params kept |",
             "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ok = "yes" if abs(r["achieved"] / r["target"] - 1) <= 0.1 else "no"
        lines.append(f"| {r['model']} | {r['batch']} | {r['target']:g} | {r['predicted_fraction']:.3f} | "
                     f"{r['achieved']:.3f} | {ok} | {r['macs_kept']:.1%} | {r['params_kept']:.1%} | "
                     f"{r['mac_target']:.3f} | {r['mac_achieved']:.3f} | {r['mac_macs_kept']:.1%} | "
                     f"{r['mac_params_kept']:.1%} |")
    loads = [r["load_average"][0] for r in rows if r.get("load_average")]
    if loads:
        lines += ["", f"1-minute load average while measuring: {min(loads):.1f} to {max(loads):.1f} on "
                      f"{os.cpu_count()} CPUs" + (" (timings taken under load: other processes competed for the CPU)"
                                                  if max(loads) > 0.5 * (os.cpu_count() or 1) else "")]
    return "\n".join(lines)


# --- which default round-to -------------------------------------------------------------------


def round_to_study(paths: dict, args) -> tuple[str, list[dict]]:
    """Speed-up of every (model, ratio, round-to) at one batch, each pruned model timed in alternation with its
    original; then per round-to the slowest case."""
    from onnx_prune.runtime.bench import check_speedup

    batch = args.batch[0]
    rows = []
    for model, path in paths.items():
        prepared = onnx_prune.prepare(path)
        for ratio in args.ratios:
            for round_to in args.round_to:
                pruned, report = onnx_prune.prune(prepared, ratio=ratio, criterion=CRITERION, round_to=round_to,
                                                  seed=args.seed, threads=args.threads, latency_batch=batch)
                check = check_speedup(path, pruned, "cpu", args.threads, batch, repeat=args.repeat,
                                      warmup=args.warmup, seed=args.seed)
                rows.append({"model": model, "ratio": ratio, "round_to": round_to, "batch": batch,
                             "mac_reduction": report.macs_before / report.macs_after, "speedup": check.speedup,
                             "original_ms": check.original_ms, "pruned_ms": check.pruned_ms,
                             "load_average": load_average()})
                print(f"      {model:<30} r={ratio:g} round-to={round_to}: MACs {rows[-1]['mac_reduction']:.2f}x "
                      f"fewer, speed-up {check.speedup:.2f}x ({check.original_ms:.2f} -> {check.pruned_ms:.2f} ms)",
                      file=sys.stderr, flush=True)
    header = "| model | " + " | ".join(f"r={r:g} rt={t}" for r in args.ratios for t in args.round_to) + " |"
    lines = [f"## Speed-up over the original by round-to (CPU, batch {batch}, {args.threads} threads, "
             f"{args.repeat} alternating runs each)", "",
             "Each cell: measured speed-up / MAC reduction (MACs before / after); efficiency = their quotient.", "",
             header,
             "|---|" + "---:|" * (len(args.ratios) * len(args.round_to))]
    for model in paths:
        cells = []
        for ratio in args.ratios:
            for round_to in args.round_to:
                r = next(x for x in rows if x["model"] == model and x["ratio"] == ratio and x["round_to"] == round_to)
                cells.append(f"{r['speedup']:.2f}x / {r['mac_reduction']:.2f}x"
                             + (" **slower**" if r["speedup"] < 1 else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| round-to | slowest speed-up | cases slower than the original | median MAC reduction | "
                  "median speed-up | median efficiency |", "|---|---:|---:|---:|---:|---:|"]
    for round_to in args.round_to:
        mine = [r for r in rows if r["round_to"] == round_to]
        slowest = min(mine, key=lambda r: r["speedup"])
        efficiency = float(np.median([r["speedup"] / r["mac_reduction"] for r in mine]))
        reduction = float(np.median([r["mac_reduction"] for r in mine]))
        speedup = float(np.median([r["speedup"] for r in mine]))
        lines.append(f"| {round_to} | {slowest['speedup']:.2f}x ({slowest['model']} r={slowest['ratio']:g}) | "
                     f"{sum(r['speedup'] < 1 for r in mine)} of {len(mine)} | {reduction:.2f}x | {speedup:.2f}x | "
                     f"{efficiency:.2f} |")
    return "\n".join(lines), rows


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    np.random.seed(args.seed)  # nothing here should draw from the global generator; pin it anyway

    paths = {}
    for model in args.models:
        path = args.zoo / f"{model}_{args.exporter}.onnx"
        if not path.is_file():
            print(f"latency_table: {path} not found; build it with: python models/build_zoo.py "
                  f"--models {model} --exporters {args.exporter}", file=sys.stderr)
            return 2
        paths[model] = path

    if args.round_to_study:
        load_start = load_average()
        table, rows = round_to_study(paths, args)
        text = "\n".join([table, "", f"Command: `{command}`; load average {load_start} before, {load_average()} "
                          f"after, on {os.cpu_count()} CPUs ({cpu_model()}, onnxruntime {runtime_versions()['onnxruntime']})"])
        print(text)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = "latency_round_to_cpu" + ("" if args.batch[0] == 1 else f"_b{args.batch[0]}")
        (args.out_dir / f"{stem}.md").write_text(text + "\n")
        (args.out_dir / f"{stem}.json").write_text(json.dumps(
            {"command": command, "started_utc": started_at, "git": git_state(), "rows": rows,
             "load_average_start": load_start, "load_average_end": load_average()}, indent=1) + "\n")
        return 0
    requested = [CPU] + ([CUDA] if args.provider == "cuda" else [])
    providers = available_providers(requested)  # prints a notice for CUDA when it cannot run, keeps CPU
    machine = machine_info(args.threads, providers)
    load_start = load_average()
    watch = CpuWatch()
    time.sleep(1.0)
    idle_check = watch.other_share()  # what the rest of the machine does while we do nothing
    if idle_check is not None and idle_check > OTHER_LOAD_LIMIT:
        print(f"latency_table: warning: other processes use {idle_check:.0%} of the CPU right now; "
              "timings will be disturbed (see 'other load' below)", file=sys.stderr)
    disturbed = []  # labels of measurements during which other processes used > OTHER_LOAD_LIMIT of the CPU
    per_model = 1 + len(args.ratios) * len(args.round_to)
    total = len(args.models) * per_model * len(providers) * len(args.batch)
    done = 0

    def wait_for_quiet(max_seconds: float) -> float | None:
        """Sleep in 1 s steps until other processes leave the CPU alone (or time is up); last share seen."""
        share, deadline = None, time.perf_counter() + max_seconds
        watch.other_share()
        while time.perf_counter() < deadline:
            time.sleep(1.0)
            share = watch.other_share()
            if share is None or share <= OTHER_LOAD_LIMIT:
                break
        return share

    retry_seconds_left = args.retry_budget

    def timed(model_or_path, label: str) -> tuple[list, dict, dict]:
        """Time one model at every provider and batch, one batch at a time (same cached session).

        A batch whose measurement other processes disturbed is timed again after waiting for quiet,
        up to --retries times while the --retry-budget lasts; the least disturbed attempt is kept.
        Returns the results and, per (provider, batch), other processes' CPU share and attempts made.
        """
        nonlocal done, retry_seconds_left
        kept: dict[tuple[str, int], tuple[float, object]] = {}
        other_load: dict[tuple[str, int], float | None] = {}
        attempts: dict[tuple[str, int], int] = {}
        for position, batch in enumerate(args.batch):
            for attempt in range(args.retries + 1):
                shares = {}

                def progress(result) -> None:
                    key = (result.provider, result.batch)
                    share = watch.other_share()  # also starts the next provider's window
                    shares[key] = share
                    index = done + position * len(providers) + providers.index(result.provider) + 1
                    load = "n/a" if share is None else f"{100 * share:3.0f}%"
                    flag = "  <- disturbed" if share is not None and share > OTHER_LOAD_LIMIT else ""
                    again = f" (retry {attempt})" if attempt else ""
                    print(f"[{index:3d}/{total}] {label:<32} {SHORT.get(result.provider, result.provider):<4} "
                          f"batch {result.batch:<3d} median {result.median_ms:9.2f} ms  p90 {result.p90_ms:9.2f} ms"
                          f"  other load {load}  ({time.perf_counter() - wall_start:4.0f} s){again}{flag}",
                          file=sys.stderr, flush=True)

                began = time.perf_counter()
                watch.other_share()  # start the window here: pruning is ours, but do not count it twice
                results = benchmark(model_or_path, providers=providers, batches=[batch], warmup=args.warmup,
                                    repeat=args.repeat, threads=args.threads, seed=args.seed, progress=progress)
                if attempt:
                    retry_seconds_left -= time.perf_counter() - began
                for result in results:
                    key = (result.provider, result.batch)
                    share = shares.get(key)
                    attempts[key] = attempt + 1
                    if key not in kept or (share or 0.0) < (kept[key][0] or 0.0):
                        kept[key] = (share, result)
                        other_load[key] = share
                worst = max((share or 0.0 for share in shares.values()), default=0.0)
                if worst <= OTHER_LOAD_LIMIT or attempt == args.retries or retry_seconds_left <= 0:
                    break
                began = time.perf_counter()
                share = wait_for_quiet(min(args.quiet_wait, retry_seconds_left))
                retry_seconds_left -= time.perf_counter() - began
                print(f"      {label} batch {batch}: other processes used up to {worst:.0%} of the CPU; measuring "
                      f"again (now {'n/a' if share is None else f'{share:.0%}'}; retry budget left "
                      f"{max(retry_seconds_left, 0):.0f} s)", file=sys.stderr, flush=True)
        done += len(kept)
        for (provider, batch), share in other_load.items():
            if share is not None and share > OTHER_LOAD_LIMIT:
                disturbed.append(f"{label} {SHORT.get(provider, provider)} batch {batch}")
        ordered = [kept[(provider, batch)][1] for provider in providers for batch in args.batch]
        return ordered, other_load, attempts

    def latency_dicts(results: list, other_load: dict, attempts: dict, provider: str) -> list[dict]:
        return [dict(r.to_dict(), other_cpu_share=other_load.get((r.provider, r.batch)),
                     attempts=attempts.get((r.provider, r.batch))) for r in results if r.provider == provider]

    records, target_records = [], []
    for model in args.models:
        path = paths[model]
        prepared = onnx_prune.prepare(path)  # analysed once, pruned at every ratio / round-to
        if args.targets_only:
            for batch in args.batch:
                target_records += latency_target_rows(model, path, prepared, batch, args, providers[-1])
            continue
        base, base_load, base_attempts = timed(path, f"{model} original")
        base_record = {"model": model, "path": os.path.relpath(path, REPO), "ratio": 0, "round_to": None,
                       "latency": {p: latency_dicts(base, base_load, base_attempts, p) for p in providers}}
        records.append(base_record)
        for ratio in args.ratios:
            for round_to in args.round_to:
                t0 = time.perf_counter()
                pruned, report = onnx_prune.prune(prepared, ratio=ratio, criterion=CRITERION, round_to=round_to,
                                                  seed=args.seed, threads=args.threads,
                                                  latency_batch=min(args.batch), provider=providers[-1])
                prune_s = time.perf_counter() - t0
                if not report.macs_before or not report.macs_after:
                    raise RuntimeError(f"{model}: MAC count unavailable (dynamic spatial dims?)")
                mac_reduction = report.macs_before / report.macs_after
                base_record.setdefault("macs", report.macs_before)
                base_record.setdefault("params", report.params_before)
                label = f"{model} r={_ratio_text(ratio)} round-to={round_to}"
                print(f"      {label:<32} pruned in {prune_s:.1f} s: MACs {mac_reduction:.2f}x fewer, "
                      f"params {100 * report.params_after / report.params_before:.1f}% kept",
                      file=sys.stderr, flush=True)
                results, load, attempts = timed(pruned, label)
                records.append({
                    "model": model, "ratio": ratio, "round_to": round_to, "criterion": CRITERION,
                    "macs_before": report.macs_before, "macs_after": report.macs_after,
                    "params_before": report.params_before, "params_after": report.params_after,
                    "channels_before": report.channels_before, "channels_after": report.channels_after,
                    "mac_reduction": mac_reduction, "params_kept": report.params_after / report.params_before,
                    "prune_seconds": round(prune_s, 3),
                    "prune_options": getattr(report, "options", None),
                    "latency": {p: latency_dicts(results, load, attempts, p) for p in providers},
                    "comparison": {p: compare_latency([r for r in base if r.provider == p],
                                                      [r for r in results if r.provider == p], mac_reduction)
                                   for p in providers},
                })
                del pruned
        for batch in args.batch if args.target_latency else []:
            target_records += latency_target_rows(model, path, prepared, batch, args, providers[-1])

    seconds = time.perf_counter() - wall_start
    load_end = load_average()
    git = git_state()
    load_known = any(entry.get("other_cpu_share") is not None
                     for record in records for entries in record["latency"].values() for entry in entries)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for provider in providers:
        short = SHORT.get(provider, provider)
        table = markdown_table(records, args.batch, provider)
        md = markdown_report(table, machine, provider, args, command, started_at, seconds,
                             [d for d in disturbed if f" {short} batch " in d], load_known)
        if target_records and provider == providers[-1]:
            md += "\n" + latency_target_markdown(target_records, args) + "\n"
        print(md)
        (args.out_dir / f"latency_{short}.md").write_text(md)
        data = {
            "command": command,
            "argv": sys.argv if argv is None else [sys.argv[0], *argv],
            "cwd": os.getcwd(),
            "started_utc": started_at,
            "seconds": round(seconds, 1),
            "git": git,
            "provider": provider,
            "providers_requested": requested,
            "providers_measured": providers,
            "machine": dict(machine, line=machine_line(machine, provider),
                            load_average_start=load_start, load_average_end=load_end,
                            other_cpu_share_before_start=idle_check),
            "options": {"models": args.models, "exporter": args.exporter, "ratios": args.ratios,
                        "round_to": args.round_to, "batches": args.batch, "criterion": CRITERION,
                        "threads": args.threads, "warmup": args.warmup, "repeat": args.repeat, "seed": args.seed,
                        "retries": args.retries, "quiet_wait": args.quiet_wait,
                        "retry_budget": args.retry_budget},
            "disturbed_measurements": [d for d in disturbed if f" {short} batch " in d],
            "other_load_limit": OTHER_LOAD_LIMIT,
            "records": [
                {k: (v[provider] if k in ("latency", "comparison") else v) for k, v in record.items()}
                for record in records
            ],
            "table_markdown": table,
            "latency_targets": target_records if provider == providers[-1] else [],
        }
        with open(args.out_dir / f"latency_{short}.json", "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        print(f"latency_table: wrote {args.out_dir / f'latency_{short}.md'} and .json", file=sys.stderr)
    print(f"latency_table: done in {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
