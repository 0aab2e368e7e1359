"""`onnx-prune`: prune a model as one step of a deployment pipeline, or `analyze` / `plan` / `apply` / `bench` /
`report`.

Results (tables, the summary, `--json`) go to stdout; progress and notices to stderr; `--quiet` leaves only
errors. Exit status: 0 ok, 1 input error, 2 usage error, 3 internal error (a bug), 4 a quality gate failed,
130/143 interrupted (SIGINT/SIGTERM). The order of a run is fixed: check the command line and every output path,
load the model and the validation data, prune, check and validate the result, apply the gates, and only then
write (model atomically, then the reports); on any error or failed gate nothing new exists.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import math
import os
import re
import signal
import sys
import time
import traceback

VERSION_FALLBACK = "0.1.0"
EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_BUG, EXIT_GATE = 0, 1, 2, 3, 4
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
COMMANDS = ("analyze", "plan", "apply", "bench", "report")

EXAMPLES = """\
examples:
  # prune the bundled Fashion-MNIST resnet20 to 90% of its MACs (data-free RED), and measure its accuracy
  # before and after on the committed evaluation images (uint8 pixels, normalised as in training)
  onnx-prune models/trained/resnet20.onnx small.onnx --method red --target-macs 0.9 \\
      --inputs models/trained/fmnist_eval.npz --mean 0.2860 --std 0.3530

  # a CI step: keep 60% of the MACs, repair on calibration images, fail (exit 4, nothing written) below 95%
  # top-1 agreement with the original on held-out data; one JSON summary on stdout
  onnx-prune model.onnx pruned.onnx --target-macs 0.6 --repair --calib calib_images/ \\
      --inputs val.npz --labels val_labels.txt --min-agreement 0.95 --json --report report.json

  # see what changed, per layer, and draw it
  onnx-prune analyze pruned.onnx --against model.onnx
  onnx-prune report report.json --plot channels.png

exit status: 0 ok, 1 input error, 2 usage error, 3 internal error (a bug: please report it),
             4 a quality gate (--min-agreement, --max-rel-error, --min-accuracy, --min-speedup) failed;
             nothing was written
"""


# --- errors, signals and output --------------------------------------------------------------------


class CommandLineError(Exception):
    """A command line that cannot be meant (exit 2): unknown flag, bad value syntax, a typo'd choice."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised where the program is, so `finally` blocks remove temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


def install_signal_handlers() -> dict:
    """SIGTERM behaves like SIGINT: an exception that unwinds (and cleans up) instead of an abrupt death.
    Returns the previous handlers (to restore when `main` is called in-process)."""
    previous = {}
    for signum in SIGNAL_EXIT:
        try:
            previous[signum] = signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main thread (embedded use): leave the handlers alone
            pass
    return previous


def did_you_mean(word: str, candidates) -> str:
    """' (did you mean X?)' for the closest candidate, or ''."""
    candidates = [str(c) for c in candidates]
    lowered = {c.lower(): c for c in candidates}
    match = lowered.get(word.lower()) or next(iter(difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)),
                                              None)
    if match is None:
        match = next(iter(difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)), None)
        match = lowered.get(match) if match else None
    return f" (did you mean {match}?)" if match else ""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that suggest the closest flag or choice."""

    def error(self, message: str):
        choice = re.search(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            flag, value, options = choice.groups()
            names = re.findall(r"'([^']*)'", options) or [o.strip() for o in options.split(",")]
            message = f"{flag}: unknown value '{value}'{did_you_mean(value, names)}; choose from {', '.join(names)}"
        raise CommandLineError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse(self, argv: list[str]) -> argparse.Namespace:
        args, extra = self.parse_known_args(argv)
        if extra:
            flags = [s for action in self._actions for s in action.option_strings]
            word = extra[0]
            if word.startswith("-"):
                name = word.split("=", 1)[0]
                raise CommandLineError(f"{self.prog}: unknown option {name}{did_you_mean(name, flags)} "
                                       f"(see {self.prog} --help)")
            raise CommandLineError(f"{self.prog}: unexpected argument '{word}' (see {self.prog} --help)")
        return args


class Console:
    """Where each kind of text goes: results to stdout, notices to stderr, nothing but errors when quiet."""

    def __init__(self, quiet: bool = False, json_mode: bool = False):
        self.quiet, self.json_mode = quiet, json_mode

    def result(self, *lines: str) -> None:
        if not (self.quiet or self.json_mode):
            for line in lines:
                print(line, file=sys.stdout)

    def notice(self, *lines: str) -> None:
        if not self.quiet:
            for line in lines:
                print(line, file=sys.stderr)

    def document(self, data: dict) -> None:
        """The one machine-readable summary of --json."""
        print(json.dumps(data, indent=1, default=_json_default, allow_nan=False), file=sys.stdout)

    @contextlib.contextmanager
    def muted(self):
        """Silence library progress (blend search, provider notices) when quiet; errors still raise."""
        if self.quiet:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                yield
        else:
            yield


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def _finite(value):
    """NaN/Inf become None in JSON (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- parsers ---------------------------------------------------------------------------------------


def _add_fields(p: argparse.ArgumentParser, names: set[str] | None = None) -> None:
    """One flag per `PruneOptions` field (all, or those in `names`), generated from the field metadata."""
    from onnx_prune.options import cli_groups, cli_spec

    sections: dict[str, argparse._ArgumentGroup] = {}
    titles = cli_groups()
    for name, flag, kwargs in cli_spec():
        if names is not None and name not in names:
            continue
        title = titles.get(name, "")
        if title and title not in sections:
            sections[title] = p.add_argument_group(title)
        (sections.get(title) or p).add_argument(flag, **kwargs)


def _add_choice_options(p: argparse.ArgumentParser) -> None:
    """What to remove: the options `prune` and `plan` share."""
    _add_fields(p)
    p.add_argument("--blend-report", metavar="FILE", help="save the chosen blend weights and clusters")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """How to check, gate and write the result: the options `prune` and `apply` share."""
    check = p.add_argument_group("validation (before anything is written)")
    check.add_argument("--inputs", metavar="DATA",
                       help="validation data: .npz of input name -> array (N samples along the batch axis; uint8 "
                            "arrays are pixels), .npy, an image folder, or a .py data loader; default: 4 "
                            "generated random inputs (synthetic: says little about real accuracy)")
    check.add_argument("--data-loader", metavar="FILE.py",
                       help="validation data from load_data() in FILE.py, yielding feed dicts (polygraphy's "
                            "convention; a 'label' entry is that feed's labels)")
    check.add_argument("--labels", metavar="FILE",
                       help="class ids of the validation samples (.npy, .npz or .txt; default: a 'label(s)' "
                            "array in the --inputs .npz): accuracy before and after")
    check.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                       help="concrete shape for an input with dynamic dims other than batch (generated inputs)")
    check.add_argument("--no-validate", action="store_true", help="skip the comparison with the original")
    check.add_argument("--no-speed-check", action="store_true",
                       help="do not time the result against the original (by default a quick check, about half a "
                            "second of alternating runs on --provider at --latency-batch, warns loudly when the "
                            "result is slower; skipped for originals over 512 MiB of weights)")
    gates = p.add_argument_group("gates (exit 4 and write nothing when one fails)")
    gates.add_argument("--min-agreement", type=float, metavar="A",
                       help="least top-1 agreement with the original, in [0, 1]")
    gates.add_argument("--max-rel-error", type=float, metavar="E",
                       help="largest relative output error ||pruned - original|| / ||original||")
    gates.add_argument("--min-accuracy", type=float, metavar="A", help="least accuracy after pruning (needs labels)")
    gates.add_argument("--keep-failed", action="store_true", help="write the model even when a gate fails "
                       "(the exit status is still 4)")
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE", help="write the full report as JSON")
    out.add_argument("--external-data", action="store_true",
                     help="store weights in OUT.data beside the model (default: only if the input did or >2 GB)")
    out.add_argument("--show-groups", action="store_true",
                     help="print each channel group: producers, channels and MAC share before -> after")
    out.add_argument("--json", action="store_true", help="print one machine-readable JSON summary on stdout")
    out.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("onnx-prune")
    except Exception:  # not installed (run from a checkout)
        return VERSION_FALLBACK


def _prune_parser() -> Parser:
    p = Parser(prog="onnx-prune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
               description="Remove whole channels from an ONNX CNN and write a smaller dense model.\n\n"
                           "Subcommands: 'onnx-prune analyze IN [--against ORIGINAL]' shows the channel groups; "
                           "'onnx-prune plan IN PLAN.json' writes the plan\nfor review and 'onnx-prune apply IN "
                           "PLAN.json OUT' applies it; 'onnx-prune bench MODEL [OTHER]' times models; "
                           "'onnx-prune report\nREPORT.json [--plot out.png]' summarises and draws reports.")
    p.add_argument("--version", action="version", version=f"onnx-prune {_version()}")
    p.add_argument("input", help="model to prune (.onnx; external data is read from beside it)")
    p.add_argument("output", help="where to write the pruned model (never a file the input reads)")
    _add_choice_options(p)
    _add_output_options(p)
    return p


def _plan_parser() -> Parser:
    p = Parser(prog="onnx-prune plan", description="Write the plan (kept channels per group) that the same "
               "options would apply, as JSON to review or edit.")
    p.add_argument("input")
    p.add_argument("plan", help="JSON file to write")
    _add_choice_options(p)
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _apply_parser() -> Parser:
    from onnx_prune.runtime.data import PREPROCESSING_FIELDS

    p = Parser(prog="onnx-prune apply", description="Apply a plan written by 'onnx-prune plan'.")
    p.add_argument("input")
    p.add_argument("plan")
    p.add_argument("output")
    _add_fields(p, {"seed", *PREPROCESSING_FIELDS})
    _add_output_options(p)
    return p


def _analyze_parser() -> Parser:
    p = Parser(prog="onnx-prune analyze",
               description="Show the channel groups of a model: sizes, MAC share, what is frozen and why; with "
                           "--against ORIGINAL, what pruning changed in each group of the original.")
    p.add_argument("input")
    p.add_argument("--against", metavar="ORIGINAL",
                   help="the model INPUT was pruned from: show channels and MAC share before -> after per group")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--all", action="store_true", help="list every group, not only the 40 largest by MAC share")
    p.add_argument("--criteria-clusters", action="store_true",
                   help="also show how the pruning criteria cluster (Spearman rank correlation per group)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _bench_parser() -> Parser:
    p = Parser(prog="onnx-prune bench", description="Latency of one model, or of two side by side "
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
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _report_parser() -> Parser:
    p = Parser(prog="onnx-prune report", description="Summarise reports written with --report; --plot draws "
               "channels kept per layer and, for several reports, accuracy (or agreement) against MACs kept.")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--plot", metavar="OUT.png", help="draw the reports (needs matplotlib: the 'plot' extra)")
    p.add_argument("--label", action="append", default=None, metavar="TEXT",
                   help="legend label per report, in order (default: method and MACs kept)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


# --- checks before any work ------------------------------------------------------------------------


def check_outputs(input_path, model_path=None, others: dict | None = None) -> None:
    """The one place that refuses output paths: none may be a file the input reads, two outputs may not be one
    file, and each folder must exist (runtime.io.check_output_paths)."""
    from onnx_prune.runtime import io as model_io

    others = {label: path for label, path in (others or {}).items() if path}
    if hasattr(model_io, "check_output_paths"):
        model_io.check_output_paths(input_path, model_path, others)
        return
    from onnx_prune.errors import PruneError  # older runtime.io: model paths only, then the reports here

    if model_path is not None:
        model_io.refuse_overwrite(input_path, model_path)
    for label, path in others.items():
        for target in [input_path, model_path]:
            if target and os.path.abspath(path) == os.path.abspath(target):
                raise PruneError(f"refusing to write {label} {path}: it is {target}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise PruneError(f"the folder of {label} does not exist: {os.path.dirname(path) or '.'}")


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise CommandLineError(f"--shape {item}: expected NAME=D0,D1,... with integers") from None
    return shapes


def _known_values() -> dict[str, list[str]]:
    """The names `--method`, `--criterion` and `--aggregate` accept, for did-you-mean."""
    from onnx_prune.analysis.criteria import AGGREGATIONS, CALIBRATION_CRITERIA, CRITERION_NAMES

    try:
        from onnx_prune.methods import METHODS
    except ImportError:
        from onnx_prune.pipeline import METHODS
    return {"method": ["auto", *METHODS], "aggregate": list(AGGREGATIONS),
            "criterion": list(CRITERION_NAMES) + list(CALIBRATION_CRITERIA) + ["blend"]}


def _check_values(args) -> None:
    """Typos in named values and non-finite or negative numbers are usage errors (exit 2)."""
    for name, known in _known_values().items():
        value = getattr(args, name, None)
        if value is not None and value not in known:
            raise CommandLineError(f"--{name}: unknown value '{value}'{did_you_mean(value, known)}; choose from "
                                   f"{', '.join(known)}")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CommandLineError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    _parse_shapes(getattr(args, "shape", None) or [])
    if getattr(args, "seed", 0) is not None and getattr(args, "seed", 0) < 0:
        raise CommandLineError(f"--seed must be a non-negative integer, got {args.seed}")
    for name in ("min_agreement", "min_accuracy"):
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise CommandLineError(f"--{name.replace('_', '-')} is a share, in [0, 1]; got {value}")
    if getattr(args, "max_rel_error", None) is not None and args.max_rel_error < 0:
        raise CommandLineError(f"--max-rel-error must be >= 0, got {args.max_rel_error}")
    gates = [g for g in ("min_agreement", "max_rel_error", "min_accuracy") if getattr(args, g, None) is not None]
    if getattr(args, "no_validate", False):
        needing = gates + [n for n in ("inputs", "data_loader", "labels") if getattr(args, n, None)]
        if needing:
            raise CommandLineError(f"--{needing[0].replace('_', '-')} needs validation: drop --no-validate")
    if getattr(args, "inputs", None) and getattr(args, "data_loader", None):
        raise CommandLineError("give validation data once: --inputs or --data-loader, not both")
    if getattr(args, "labels", None) and not (getattr(args, "inputs", None) or getattr(args, "data_loader", None)):
        raise CommandLineError("--labels label real data: give --inputs (or --data-loader) too")
    if getattr(args, "min_accuracy", None) is not None and not (
            getattr(args, "labels", None) or getattr(args, "inputs", None) or getattr(args, "data_loader", None)):
        raise CommandLineError("--min-accuracy needs labelled data: give --inputs with --labels")


def _options_from(args):
    from onnx_prune.options import PruneOptions, cli_spec
    from onnx_prune.pipeline import check_options

    options = PruneOptions(**{name: getattr(args, name) for name, _, _ in cli_spec()},
                           progress=not getattr(args, "quiet", False))
    check_options(options)
    return options


def _preprocessing(args) -> dict:
    from onnx_prune.runtime.data import PREPROCESSING_FIELDS

    return {name: getattr(args, name, None) for name in PREPROCESSING_FIELDS}


def as_flags(message: str) -> str:
    """An API message that names keywords (`image_size=`) naming the flags instead (`--image-size`)."""
    return re.sub(r"\b([a-z]+(?:_[a-z]+)*)=(?=\W|$)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _validation_data(args, prepared):
    """The validation Dataset, loaded before any pruning so a bad file costs nothing (None: --no-validate)."""
    from onnx_prune.errors import PruneError
    from onnx_prune.runtime.data import Dataset, load_data
    from onnx_prune.runtime.fidelity import make_inputs

    if args.no_validate:
        return None
    spec = args.inputs or args.data_loader
    flag = "--inputs" if args.inputs else "--data-loader"
    if spec:
        try:
            return load_data(spec, prepared.model, labels=args.labels, **_preprocessing(args))
        except PruneError as err:
            raise type(err)(f"{flag} {spec}: {as_flags(str(err))}") from None
    try:
        feeds = make_inputs(prepared.model, seed=args.seed, shapes=_parse_shapes(args.shape) or None, samples=4)
    except ValueError as err:
        raise PruneError(f"cannot generate validation inputs: {err}; give --shape or --inputs (or --no-validate)") \
            from None
    return Dataset(feeds, f"{len(feeds)} generated inputs (seed {args.seed})", synthetic=True)


# --- the run: build -> check -> validate -> gates -> write -> report ----------------------------------


def _write_text(path: str, text: str, input_path=None, label: str = "report") -> None:
    """Atomically (temporary file beside it, then rename), never over a file the input reads (runtime.io)."""
    from onnx_prune.runtime import io as model_io

    model_io.write_text(path, text, input_path=input_path, label=label)


def _remove_written(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _write_json(path: str, data: dict, input_path=None, label: str = "--report") -> None:
    from onnx_prune.runtime.sessions import runtime_versions

    data = _finite(dict(data, versions=runtime_versions()))
    _write_text(path, json.dumps(data, indent=1, default=_json_default, allow_nan=False) + "\n", input_path, label)


def _gate_failures(args, validation) -> list[str]:
    from onnx_prune.runtime.fidelity import check_gates

    if validation is None:
        return []
    failures = check_gates(validation, args.min_agreement, args.max_rel_error, args.min_accuracy)
    return [f.message("--" + f.option.replace("_", "-")) for f in failures]


SPEED_CHECK_BUDGET_S = 0.5          # timed runs of the default check (plus two sessions and a warm-up each)
SPEED_CHECK_MAX_RUNS = 200          # timed pairs of the default check on small models (the budget decides)
SPEED_CHECK_MAX_BYTES = 512 << 20   # originals with more weight bytes are not timed unless --min-speedup asks
                                    # (two sessions hold about twice the weights again)


def _weight_bytes(model) -> int:
    """Bytes of the model's weights (those kept in the proto; external ones by their recorded length)."""
    total = 0
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        total += length if length is not None else len(tensor.raw_data) or tensor.ByteSize()
    return total


def _speed_gate(args, options, prepared, model, console: Console) -> tuple[dict | None, list[str]]:
    """Never slower, loudly: time the original and the result in alternation (runtime.bench.check_speedup,
    a quick budgeted check by default, repeated once before a warning) and warn on stderr when the result is
    slower in both; with --min-speedup the check's full run decides a gate.  Skipped with --no-speed-check,
    and by default for originals over SPEED_CHECK_MAX_BYTES of weights; a model that cannot be timed (e.g.
    dynamic dims without --shape) is reported as not measured, never as a failure, unless --min-speedup needs
    the figure.
    Returns the check's record (None when skipped) and the gate failures."""
    from onnx_prune.errors import PruneError
    from onnx_prune.options import PruneOptions
    from onnx_prune.runtime.bench import SLOWER_BELOW, check_speedup

    opts = options if options is not None else PruneOptions()
    min_speedup = getattr(opts, "min_speedup", None)
    if min_speedup is None and getattr(args, "no_speed_check", False):
        return None, []
    if min_speedup is None and _weight_bytes(prepared.model) > SPEED_CHECK_MAX_BYTES:
        reason = (f"the original has over {SPEED_CHECK_MAX_BYTES >> 20} MiB of weights; --min-speedup S times "
                  "it anyway")
        console.notice(f"onnx-prune: note: speed not measured: {reason}")
        return {"measured": False, "reason": reason}, []
    console.notice(f"onnx-prune: timing the original and the pruned model on {opts.provider} ...")

    def timed():
        with console.muted():
            return check_speedup(prepared.model, model, provider=opts.provider, threads=opts.threads,
                                 batch=opts.latency_batch, seed=opts.seed, shapes=_parse_shapes(args.shape) or None,
                                 warmup=3, repeat=20 if min_speedup is not None else SPEED_CHECK_MAX_RUNS,
                                 budget_s=None if min_speedup is not None else SPEED_CHECK_BUDGET_S)

    try:
        check = timed()
        if min_speedup is None and check.speedup < SLOWER_BELOW:
            # a quick check on a busy machine can misread: warn only when a second one agrees
            check = max(check, timed(), key=lambda c: c.speedup)
    except Exception as err:  # noqa: BLE001 - timing is a check on a finished result: never a traceback
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        if min_speedup is not None:
            raise PruneError(f"--min-speedup: cannot time the models ({reason}); give --shape for dynamic "
                             "inputs") from None
        console.notice(f"onnx-prune: note: speed not measured ({reason}); give --shape for dynamic inputs, "
                       "or --no-speed-check")
        return {"measured": False, "reason": reason}, []
    message, status = check.verdict(min_speedup, slower_below=1.0 if min_speedup is not None else SLOWER_BELOW)
    console.result(check.summary())
    record = dict(check.to_dict(), measured=True)
    if status:
        return record, [f"speed-up {check.speedup:.2f}x is below --min-speedup {min_speedup:g}"]
    if message:
        print(message, file=sys.stderr)  # loud: even with --quiet
    return record, []


def _finish(args, console: Console, prepared, model, report, data, started: float, blend=None,
            options=None) -> int:
    """Check, validate, gate, then write and report: what `prune` and `apply` share."""
    from onnx_prune import report as summaries
    from onnx_prune.runtime import io as model_io
    from onnx_prune.runtime.fidelity import format_validation, validate

    if hasattr(model_io, "check_result"):  # no zero-sized dims, onnxruntime loads it: before anything else
        model_io.check_result(model, prepared.model)
    validation = None
    if data is not None:
        console.notice(f"onnx-prune: validating against the original on {data.source} ...")
        with console.muted():
            validation = validate(prepared.model, model, data, seed=args.seed)
        console.notice(*(f"onnx-prune: note: {as_flags(n)}" for n in validation.notes))
    failures = _gate_failures(args, validation)
    speed, slow = _speed_gate(args, options, prepared, model, console)
    failures += slow
    result = report.to_dict()
    if speed is not None:
        result["speed"] = speed
    result["validation"] = validation.to_dict() if validation else None
    result["gates"] = {"passed": not failures, "failures": failures,
                       "thresholds": {g: getattr(args, g) for g in ("min_agreement", "max_rel_error", "min_accuracy",
                                                                    "min_speedup")
                                      if getattr(args, g, None) is not None}}
    changes = None
    if args.show_groups or args.report:
        changes = summaries.group_changes(prepared, model)
        result["group_changes"] = [c.to_dict() for c in changes]
    written = not failures or args.keep_failed
    result["output"] = args.output if written else None

    console.result(f"{report.source} -> {args.output}" + ("" if written else " (not written: a gate failed)"),
                   "  " + summaries.cost_line(result), *("  " + line for line in summaries.target_lines(result)))
    if validation is not None:
        console.result(format_validation(validation))
    if changes is not None and args.show_groups:
        console.result("", summaries.format_group_changes(changes))
    if written:
        _write_outputs(args, prepared, model, result, blend)
        console.notice(f"onnx-prune: wrote {args.output}" + (f" and {args.report}" if args.report else "")
                       + f" in {time.perf_counter() - started:.2f} s")
    if args.json:
        console.document(_finite(_json_summary(result, args, failures)))
    if failures:  # one line, naming every metric that missed its threshold
        print(f"onnx-prune: gate failed: {'; '.join(failures)}" + ("" if written else "; nothing written"),
              file=sys.stderr)
    return EXIT_GATE if failures else EXIT_OK


def _write_outputs(args, prepared, model, result: dict, blend) -> None:
    """Model (atomically), then the blend weights and the report; if a later write fails, the earlier ones go."""
    from onnx_prune.runtime.io import save

    data_file = args.output + ".data"
    had_data = os.path.exists(data_file)
    save(model, args.output, input_path=args.input, external_data=args.external_data or prepared.external_data)
    written = [args.output] + ([data_file] if not had_data and os.path.exists(data_file) else [])
    try:
        if blend is not None and getattr(args, "blend_report", None):
            from onnx_prune.blend_search import save_blend_weights

            save_blend_weights(blend, args.blend_report)
            written.append(args.blend_report)
        if args.report:
            _write_json(args.report, result, args.input)
    except BaseException:
        _remove_written(written)
        raise


def _json_summary(result: dict, args, failures: list[str]) -> dict:
    """The --json document: what a pipeline reads to decide (no per-group detail; that is in --report)."""
    from onnx_prune.report import target_record

    validation = result.get("validation") or {}
    return {"input": args.input, "output": result.get("output"), "written": result.get("output") is not None,
            "exit_status": EXIT_GATE if failures else EXIT_OK,
            "macs_before": result["macs_before"], "macs_after": result["macs_after"],
            "params_before": result["params_before"], "params_after": result["params_after"],
            "channels_before": result["channels_before"], "channels_after": result["channels_after"],
            "target": target_record(result),
            "validation": {k: validation.get(k) for k in ("source", "samples", "synthetic", "agreement",
                                                           "relative_error", "accuracy_before", "accuracy_after")}
            if validation else None,
            "speed": result.get("speed"), "gates": result["gates"],
            "report": args.report if result.get("output") else None}


def run_prune(argv: list[str], console: Console) -> int:
    args = _prune_parser().parse(argv)
    console.quiet, console.json_mode = args.quiet, args.json
    _check_values(args)
    check_outputs(args.input, args.output, {"--report": args.report, "--blend-report": args.blend_report})
    options = _options_from(args)
    import onnx_prune

    started = time.perf_counter()
    console.notice(f"onnx-prune: analysing {args.input}")
    prepared = onnx_prune.prepare(args.input)
    data = _validation_data(args, prepared)
    with console.muted():
        model, report = onnx_prune.prune(prepared, options)
    return _finish(args, console, prepared, model, report, data, started, report.details.get("blend"), options)


def run_plan(argv: list[str], console: Console) -> int:
    args = _plan_parser().parse(argv)
    console.quiet = args.quiet
    _check_values(args)
    check_outputs(args.input, None, {"the plan": args.plan})
    from onnx_prune.pipeline import plan_file

    with console.muted():
        text = plan_file(args.input, _options_from(args))
    _write_text(args.plan, text + "\n", args.input, "the plan")
    console.notice(f"onnx-prune: wrote a plan for {len(json.loads(text)['groups'])} groups to {args.plan}")
    return EXIT_OK


def run_apply(argv: list[str], console: Console) -> int:
    args = _apply_parser().parse(argv)
    console.quiet, console.json_mode = args.quiet, args.json
    _check_values(args)
    check_outputs(args.input, args.output, {"--report": args.report})
    import onnx_prune
    from onnx_prune.errors import PruneError
    from onnx_prune.pipeline import apply_plan

    try:
        with open(args.plan) as f:
            plan_json = f.read()
    except OSError as err:
        raise PruneError(f"cannot read the plan {args.plan}: {err.strerror}") from None
    started = time.perf_counter()
    prepared = onnx_prune.prepare(args.input)
    data = _validation_data(args, prepared)
    model, report = apply_plan(prepared, plan_json)
    return _finish(args, console, prepared, model, report, data, started)


def format_analysis(report, limit: int | None = 40) -> str:
    from onnx_prune.report import human

    groups = sorted(report.groups, key=lambda g: (-g.mac_share, g.id))
    shown = groups if limit is None else groups[:limit]
    rows = [[g.id, g.name, g.size, g.size - g.frozen, f"{100 * g.mac_share:.1f}%", len(g.producers),
             len(g.consumers), (g.reasons[0][:60] if g.reasons else "")] for g in shown]
    lines = [f"{report.source}: {len(groups)} channel groups, "
             f"{sum(1 for g in groups if g.size - g.frozen > 0 and g.size > 1)} prunable; "
             f"{human(report.macs)} MACs, {human(report.params)} params; "
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


def _table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*map(str, r)) for r in rows])


def run_analyze(argv: list[str], console: Console) -> int:
    args = _analyze_parser().parse(argv)
    console.quiet = args.quiet
    import onnx_prune

    if args.against:
        from onnx_prune.report import format_group_changes, group_changes
        from onnx_prune.runtime.cost import count_cost
        from onnx_prune.runtime.io import load

        original, pruned = onnx_prune.prepare(args.against), load(args.input).model
        changes = group_changes(original, pruned)
        if args.json:
            console.document({"input": args.input, "against": args.against,
                              "groups": [c.to_dict() for c in changes]})
        else:
            from onnx_prune.report import human

            try:
                before, after = count_cost(original.model), count_cost(pruned)
                console.result(f"{args.input} against {args.against}: MACs {human(before.macs)} -> "
                               f"{human(after.macs)}, params {human(before.params)} -> {human(after.params)}", "")
            except ValueError:
                console.result(f"{args.input} against {args.against} (MACs unknown: dynamic shapes)", "")
            console.result(format_group_changes(changes, None if args.all else 40))
        return EXIT_OK
    prepared = onnx_prune.prepare(args.input)
    report = onnx_prune.analyze(prepared)
    clusters = None
    if args.criteria_clusters:
        from onnx_prune.blend_search import criteria_clusters

        clusters = criteria_clusters(prepared)
    if args.json:
        console.document(dict(report.to_dict(), criteria_clusters=clusters))
    else:
        console.result(format_analysis(report, None if args.all else 40))
        if clusters is not None:
            from onnx_prune.analysis.blend import format_cluster_summary

            console.result("\n" + format_cluster_summary(clusters, per_group=False))
    return EXIT_OK


def run_report(argv: list[str], console: Console) -> int:
    args = _report_parser().parse(argv)
    console.quiet = args.quiet
    from onnx_prune.errors import PruneError
    from onnx_prune.report import plot_reports, summary

    reports = []
    for path in args.reports:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as err:
            raise PruneError(f"cannot read the report {path}: {err.strerror}") from None
        except ValueError as err:
            raise PruneError(f"{path} is not a JSON report ({err})") from None
        if not isinstance(data, dict) or "macs_before" not in data:
            raise PruneError(f"{path} is not a report written by 'onnx-prune --report'")
        reports.append(data)
    if args.label is not None and len(args.label) != len(reports):
        raise CommandLineError(f"--label given {len(args.label)} times for {len(reports)} reports")
    for path, data in zip(args.reports, reports):
        console.result(f"== {path}", summary(data), "")
    if args.plot:
        for path in args.reports:
            if os.path.exists(args.plot) and os.path.samefile(path, args.plot):
                raise PruneError(f"refusing to overwrite the report {path} with the plot")
        check_outputs(None, None, {"--plot": args.plot})
        plot_reports(reports, args.plot, args.label)
        console.notice(f"onnx-prune: drew {args.plot}")
    return EXIT_OK


def run_bench(argv: list[str], console: Console) -> int:
    args = _bench_parser().parse(argv)
    console.quiet = args.quiet
    from onnx_prune.errors import PruneError
    from onnx_prune.runtime.bench import benchmark, compare_latency, format_latency_table
    from onnx_prune.runtime.cost import cost_ratio, count_cost
    from onnx_prune.runtime.io import load

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise CommandLineError(f"--batch {args.batch}: expected comma-separated integers") from None
    if args.report:
        check_outputs(args.model, None, {"--report": args.report})
        if args.other:
            check_outputs(args.other, None, {"--report": args.report})
    shapes = _parse_shapes(args.shape)
    paths = [args.model] + ([args.other] if args.other else [])
    models = [load(p).model for p in paths]

    def progress(result):
        console.notice(f"  {result.provider} batch {result.batch}: median {result.median_ms:.2f} ms")

    results = []
    for path, model in zip(paths, models):
        console.notice(f"onnx-prune: timing {path} ...")
        try:
            results.append(benchmark(model, providers=args.provider, batches=batches, warmup=args.warmup,
                                     repeat=args.repeat, threads=args.threads, shapes=shapes or None,
                                     progress=progress))
        except ValueError as err:
            raise PruneError(f"{path}: {err}") from None
    out = {"models": paths, "results": [[r.to_dict() for r in res] for res in results]}
    if len(models) == 2:
        ratio = cost_ratio(count_cost(models[0], shapes or None), count_cost(models[1], shapes or None))
        rows = compare_latency(results[0], results[1], 1 / ratio["macs"]["ratio"])
        console.result(format_latency_table(rows))
        out.update(cost=ratio, comparison=rows)
    else:
        for r in results[0]:
            console.result(f"{r.provider:28s} batch {r.batch:4d}  median {r.median_ms:8.3f} ms  "
                           f"p90 {r.p90_ms:8.3f} ms")
    if args.report:
        _write_json(args.report, out, args.model)
    return EXIT_OK


RUNNERS = {"analyze": run_analyze, "bench": run_bench, "plan": run_plan, "apply": run_apply, "report": run_report}


def _command(argv: list[str]):
    """The subcommand runner and its arguments; a typo'd subcommand is a usage error, not a missing file."""
    first = argv[0] if argv else ""
    if first in RUNNERS:
        return RUNNERS[first], argv[1:]
    if first and not first.startswith("-") and not os.path.exists(first) and "." not in os.path.basename(first):
        hint = did_you_mean(first, COMMANDS)
        if hint:
            raise CommandLineError(f"onnx-prune: unknown command '{first}'{hint} (see onnx-prune --help)")
    return run_prune, argv


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module doc)."""
    from onnx_prune.errors import SPELLING

    previous = install_signal_handlers()
    spelling = SPELLING.set("cli")  # errors name options as flags here, as keywords for Python callers
    try:
        return _main(argv)
    finally:
        SPELLING.reset(spelling)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    console = Console(quiet="--quiet" in argv)
    try:
        if argv in (["--version"], ["-V"]):
            print(f"onnx-prune {_version()}")
            return EXIT_OK
        if not argv:
            raise CommandLineError("onnx-prune: give IN OUT, or a command (see onnx-prune --help)")
        command, rest = _command(argv)
        return command(rest, console)
    except SystemExit as done:  # --help and --version print and exit 0
        return done.code if isinstance(done.code, int) else EXIT_OK
    except Interrupted as stop:
        status, line = SIGNAL_EXIT.get(stop.signum, 130), "onnx-prune: interrupted; nothing was written"
    except KeyboardInterrupt:
        status, line = 130, "onnx-prune: interrupted; nothing was written"
    except CommandLineError as err:
        status, line = EXIT_USAGE, f"{err}" if str(err).startswith("onnx-prune") else f"onnx-prune: {err}"
    except Exception as err:
        if debug:
            traceback.print_exc()
        status, line = classify(err)
    print(line, file=sys.stderr)
    if "--json" in argv:  # a pipeline reading stdout gets a document on failure too
        console.document({"written": False, "exit_status": status, "error": line})
    return status


def classify(err: Exception) -> tuple[int, str]:
    """(exit status, the one line to print): whose problem it is decides the status (see errors.exit_status)."""
    from onnx_prune import errors

    if isinstance(err, errors.PruneError):
        status = getattr(errors, "exit_status", lambda e: EXIT_INPUT)(err)
        return status, f"onnx-prune: {'usage error' if status == EXIT_USAGE else 'error'}: {err}"
    if isinstance(err, OSError):  # the file system said no: permissions, a full disk, a folder for a file
        where = f" {err.filename}" if err.filename else ""
        return EXIT_INPUT, f"onnx-prune: error: {err.strerror or err}:{where}".rstrip(":")
    if isinstance(err, MemoryError):
        return EXIT_INPUT, "onnx-prune: error: out of memory"
    report = getattr(errors, "BUG_REPORT", "this is a bug in onnx-prune: please report it with the command line "
                     "and the output of --debug")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return EXIT_BUG, (f"onnx-prune: internal error: {type(err).__name__}: {first} - {report} "
                      "(rerun with --debug for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
