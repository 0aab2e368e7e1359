"""`onnx-prune`: prune a model, or `analyze` / `bench` one.

    onnx-prune IN OUT [--ratio R | --target-macs F | --target-params F] [--criterion C] [--aggregate A] ...
    onnx-prune analyze IN [--json]
    onnx-prune plan IN PLAN.json [options]    then    onnx-prune apply IN PLAN.json OUT
    onnx-prune bench MODEL [OTHER] [--batch 1,8] [--provider cpu|cuda|tensorrt] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from onnx_prune.errors import PruneError
from onnx_prune.runtime.io import refuse_overwrite


def _add_choice_options(p: argparse.ArgumentParser) -> None:
    """What to remove: the options `prune` and `plan` share, one flag per `PruneOptions` field."""
    from onnx_prune.options import cli_groups, cli_spec

    sections: dict[str, argparse._ArgumentGroup] = {}
    titles = cli_groups()
    for name, flag, kwargs in cli_spec():
        title = titles.get(name, "")
        if title and title not in sections:
            sections[title] = p.add_argument_group(title)
        (sections.get(title) or p).add_argument(flag, **kwargs)
    p.add_argument("--blend-report", metavar="FILE", help="save the chosen blend weights and clusters")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """How to write and check the result: the options `prune` and `apply` share."""
    p.add_argument("--report", metavar="FILE", help="write the report as JSON")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUT.data beside the model (default: only if the input did or >2 GB)")
    p.add_argument("--no-validate", action="store_true", help="skip the fidelity check against the original")
    p.add_argument("--inputs", metavar="DATA.npz", help="validation inputs: an .npz of input name -> array "
                   "(a leading sample axis allowed); default: 4 generated from the input shapes and --seed")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete shape for an input with dynamic dims other than batch (generated inputs)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnx-prune", description="Remove whole channels from an ONNX CNN and write a smaller dense model.",
        epilog="Subcommands: 'onnx-prune analyze IN' shows the channel groups; 'onnx-prune plan IN PLAN.json' "
               "writes the plan for review and 'onnx-prune apply IN PLAN.json OUT' applies it; "
               "'onnx-prune bench MODEL [OTHER]' times models with onnxruntime.")
    p.add_argument("input", help="model to prune (.onnx; external data is read from beside it)")
    p.add_argument("output", help="where to write the pruned model (never the input)")
    _add_choice_options(p)
    _add_output_options(p)
    return p


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-prune plan", description="Write the plan (kept channels per group) "
                                "that the same options would apply, as JSON to review or edit.")
    p.add_argument("input")
    p.add_argument("plan", help="JSON file to write")
    _add_choice_options(p)
    return p


def _apply_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-prune apply", description="Apply a plan written by 'onnx-prune plan'.")
    p.add_argument("input")
    p.add_argument("plan")
    p.add_argument("output")
    p.add_argument("--seed", type=int, default=0, help="seed for generated validation inputs (default 0)")
    _add_output_options(p)
    return p


def _analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-prune analyze",
                                description="Show the channel groups of a model: sizes, MAC share, what is frozen "
                                            "and why.")
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--all", action="store_true", help="list every group, not only the 40 largest by MAC share")
    p.add_argument("--criteria-clusters", action="store_true",
                   help="also show how the pruning criteria cluster (Spearman rank correlation per group)")
    return p


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-prune bench", description="Latency of one model, or of two side by side "
                                "with speed-up next to MAC reduction.")
    p.add_argument("model")
    p.add_argument("other", nargs="?")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--provider", action="append", default=None,
                   help="cpu, cuda or tensorrt; repeat for several (default: cuda if usable, and cpu)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete shape for an input with dynamic dims other than batch")
    p.add_argument("--report", metavar="FILE", help="write the results as JSON")
    return p


def _say(args, *lines: str) -> None:
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line, file=sys.stderr)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*map(str, r)) for r in rows])


def format_analysis(report, limit: int | None = 40) -> str:
    groups = sorted(report.groups, key=lambda g: (-g.mac_share, g.id))
    shown = groups if limit is None else groups[:limit]
    rows = [[g.id, g.name, g.size, g.size - g.frozen, f"{100 * g.mac_share:.1f}%", len(g.producers),
             len(g.consumers), (g.reasons[0][:60] if g.reasons else "")] for g in shown]
    lines = [f"{report.source}: {len(groups)} channel groups, "
             f"{sum(1 for g in groups if g.size - g.frozen > 0 and g.size > 1)} prunable; "
             f"{report.macs / 1e6:.1f} M MACs, {report.params / 1e6:.2f} M params; "
             f"prunable share of Conv MACs {100 * report.prunable_mac_share:.1f}%", "",
             _table(rows, ["id", "group (first producer)", "channels", "prunable", "MACs", "producers",
                           "consumers", "frozen because"])]
    if limit is not None and len(groups) > limit:
        lines.append(f"... {len(groups) - limit} smaller groups (use --all)")
    if report.frozen_reasons:
        lines += ["", "Frozen channels by reason:"]
        for reason, count in sorted(report.frozen_reasons.items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"  {count:6d}  {reason}")
    return "\n".join(lines)


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise PruneError(f"--shape {item}: expected NAME=D0,D1,... with integers") from None
    return shapes


def _options_from(args):
    from onnx_prune.options import PruneOptions
    from onnx_prune.pipeline import check_options

    from onnx_prune.options import cli_spec

    options = PruneOptions(**{name: getattr(args, name) for name, _, _ in cli_spec()})
    check_options(options)
    return options


def _finish(args, prepared, model, report, started: float) -> int:
    """Save, summarise, validate and report: what `prune` and `apply` share."""
    from onnx_prune.runtime.io import save

    save(model, args.output, input_path=args.input, external_data=args.external_data or prepared.external_data)
    result = report.to_dict()
    _say(args, f"onnx-prune: wrote {args.output} in {time.perf_counter() - started:.2f} s",
         f"  channels {report.channels_before} -> {report.channels_after}   "
         f"MACs {report.macs_before / 1e6:.1f} M -> {report.macs_after / 1e6:.1f} M "
         f"({_reduction(report.macs_before, report.macs_after)})   "
         f"params {report.params_before / 1e6:.2f} M -> {report.params_after / 1e6:.2f} M "
         f"({_reduction(report.params_before, report.params_after)})")
    if not args.no_validate:
        from onnx_prune.runtime.fidelity import compare, format_fidelity_table, load_npz_inputs, make_inputs
        try:
            inputs = (load_npz_inputs(args.inputs, prepared.model) if args.inputs else
                      make_inputs(prepared.model, seed=args.seed, shapes=_parse_shapes(args.shape) or None,
                                  samples=4))
        except (ValueError, OSError) as err:
            _say(args, f"onnx-prune: validation skipped: {err} (give --shape or --inputs)")
        else:
            source = f"{len(inputs)} samples from {args.inputs}" if args.inputs else \
                f"{len(inputs)} generated inputs (seed {args.seed})"
            _say(args, f"onnx-prune: validating against the original on {source} ...")
            fidelity = compare(prepared.model, model, inputs)
            _say(args, format_fidelity_table(fidelity))
            result["fidelity"] = fidelity.to_dict()
    if args.report:
        _write_json(args.report, result)
    return 0


def run_prune(argv: list[str]) -> int:
    args = _prune_parser().parse_args(argv)
    import onnx_prune

    refuse_overwrite(args.input, args.output)
    options = _options_from(args)
    started = time.perf_counter()
    _say(args, f"onnx-prune: analysing {args.input}")
    prepared = onnx_prune.prepare(args.input)
    model, report = onnx_prune.prune(prepared, options)
    if args.blend_report and "blend" in report.details:
        from onnx_prune.blend_search import save_blend_weights

        save_blend_weights(report.details["blend"], args.blend_report)
    return _finish(args, prepared, model, report, started)


def run_plan(argv: list[str]) -> int:
    args = _plan_parser().parse_args(argv)
    from onnx_prune.pipeline import make_plan, plan_to_json

    refuse_overwrite(args.input, args.plan)
    plan, prepared = make_plan(args.input, _options_from(args))
    text = plan_to_json(plan, prepared)
    with open(args.plan, "w") as f:
        f.write(text + "\n")
    print(f"onnx-prune: wrote a plan for {len(plan.groups)} groups to {args.plan}", file=sys.stderr)
    return 0


def run_apply(argv: list[str]) -> int:
    args = _apply_parser().parse_args(argv)
    import onnx_prune
    from onnx_prune.pipeline import apply_plan

    refuse_overwrite(args.input, args.output)
    try:
        with open(args.plan) as f:
            plan_json = f.read()
    except OSError as err:
        raise PruneError(f"cannot read the plan {args.plan}: {err.strerror}") from None
    started = time.perf_counter()
    prepared = onnx_prune.prepare(args.input)
    model, report = apply_plan(prepared, plan_json)
    return _finish(args, prepared, model, report, started)


def _reduction(before: int, after: int) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "n/a"


def _write_json(path: str, data: dict) -> None:
    from onnx_prune.runtime.sessions import runtime_versions

    data = dict(data, versions=runtime_versions())
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def run_analyze(argv: list[str]) -> int:
    args = _analyze_parser().parse_args(argv)
    import onnx_prune

    prepared = onnx_prune.prepare(args.input)
    report = onnx_prune.analyze(prepared)
    clusters = None
    if args.criteria_clusters:
        from onnx_prune.blend_search import criteria_clusters

        clusters = criteria_clusters(prepared)
    if args.json:
        print(json.dumps(dict(report.to_dict(), criteria_clusters=clusters), indent=1, default=str))
    else:
        print(format_analysis(report, None if args.all else 40))
        if clusters is not None:
            from onnx_prune.analysis.blend import format_cluster_summary

            print("\n" + format_cluster_summary(clusters, per_group=False))
    return 0


def run_bench(argv: list[str]) -> int:
    args = _bench_parser().parse_args(argv)
    from onnx_prune.runtime.bench import benchmark, compare_latency, format_latency_table
    from onnx_prune.runtime.cost import cost_ratio, count_cost
    from onnx_prune.runtime.io import load

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise PruneError(f"--batch {args.batch}: expected comma-separated integers") from None
    shapes = _parse_shapes(args.shape)
    paths = [args.model] + ([args.other] if args.other else [])
    models = [load(p).model for p in paths]

    def progress(result):
        print(f"  {result.provider} batch {result.batch}: median {result.median_ms:.2f} ms", file=sys.stderr)

    results = []
    for path, model in zip(paths, models):
        print(f"onnx-prune: timing {path} ...", file=sys.stderr)
        results.append(benchmark(model, providers=args.provider, batches=batches, warmup=args.warmup,
                                 repeat=args.repeat, threads=args.threads, shapes=shapes or None, progress=progress))
    out = {"models": paths, "results": [[r.to_dict() for r in res] for res in results]}
    if len(models) == 2:
        ratio = cost_ratio(count_cost(models[0], shapes or None), count_cost(models[1], shapes or None))
        rows = compare_latency(results[0], results[1], 1 / ratio["macs"]["ratio"])
        print(format_latency_table(rows))
        out.update(cost=ratio, comparison=rows)
    else:
        for r in results[0]:
            print(f"{r.provider:28s} batch {r.batch:4d}  median {r.median_ms:8.3f} ms  p90 {r.p90_ms:8.3f} ms")
    if args.report:
        _write_json(args.report, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = {"analyze": run_analyze, "bench": run_bench, "plan": run_plan, "apply": run_apply}
    command = commands.get(argv[0] if argv else "", run_prune)
    if command is not run_prune:
        argv = argv[1:]
    try:
        return command(argv)
    except PruneError as err:
        print(f"onnx-prune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnx-prune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        print(f"onnx-prune: internal error: {type(err).__name__}: {err} (rerun with --debug for details)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
