"""How far the pruned model's outputs drift from the original's, output by output."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .sessions import (
    CPU,
    ModelLike,
    available_providers,
    input_specs,
    make_session,
    provider_chain,
    resolve_input_shapes,
)


def _random_tensor(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == np.uint8:  # uint8 inputs are almost always images
        return rng.integers(0, 256, shape).astype(np.uint8)
    if dtype.kind in "iu":  # small non-negative values stay valid as indices, ids or counts
        return rng.integers(0, 8, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def make_inputs(
    model: ModelLike,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
    samples: int = 4,
    batch: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """`samples` random feeds (input name -> array) matching the model's input types.

    Floats are standard normal, bools random, uint8 uniform 0..255, other ints 0..7.
    Dynamic dims come from `shapes` (input name -> full shape); a dynamic leading dim
    defaults to 1, or `batch` when given (which then overrides `shapes`). Raises
    ValueError naming a dynamic dim that is left open. Same seed, same arrays.
    """
    specs = input_specs(model)
    concrete = resolve_input_shapes(specs, shapes, batch)
    rng = np.random.default_rng(seed)
    return [{spec.name: _random_tensor(rng, spec.dtype, concrete[spec.name]) for spec in specs} for _ in range(samples)]


def load_npz_inputs(path: str | os.PathLike, model: ModelLike) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz of input name -> array (or any source `data.load_feeds` reads), one dict per feed.

    An array with the input's rank is N samples split along the batch axis; one more axis is a stack of
    feeds. Raises `data.DataError` (a ValueError) for wrong names, ranks, fixed dims, dtypes or NaN/Inf.
    """
    from .data import load_feeds

    return load_feeds(path, model)


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    shape: tuple[int, ...]  # one sample's output shape
    max_abs_error: float
    relative_error: float  # ||pruned - original|| / ||original|| over all samples
    cosine_similarity: float
    top1_agreement: float | None  # share of equal argmax over classes; None unless class scores


@dataclass
class FidelityReport:
    samples: int
    provider: str  # the provider the sessions ran on first
    outputs: list[OutputFidelity]

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


BATCH_RUN = 64  # feeds of a dynamic-batch model run this many at a time (same outputs, far fewer calls)


def _batched_runs(session, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]] | None:
    """Per-feed outputs computed in chunks of concatenated feeds, or None where that is not safe: a fixed batch
    dim, feeds of different shapes, or an output without the batch axis leading."""
    if len(inputs) < 2 or any(not isinstance(i.shape[0], (str, type(None))) if i.shape else True
                              for i in session.get_inputs()):
        return None
    shapes = {tuple((k, v.shape) for k, v in sorted(feed.items())) for feed in inputs}
    if len(shapes) > 1:
        return None
    batch = _feed_batch(inputs[0])
    runs = []
    for start in range(0, len(inputs), BATCH_RUN):
        chunk = inputs[start:start + BATCH_RUN]
        joined = {name: np.concatenate([feed[name] for feed in chunk]) for name in chunk[0]}
        outputs = session.run(None, joined)
        if any(o.ndim == 0 or o.shape[0] != batch * len(chunk) for o in outputs):
            return None
        runs += [[o[i * batch:(i + 1) * batch] for o in outputs] for i in range(len(chunk))]
    return runs


def _feed_batch(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _run_stacked(session, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each output, samples stacked along a new axis 0 (feeds of unequal batch: one row of all samples)."""
    runs = _batched_runs(session, inputs) or [session.run(None, feed) for feed in inputs]
    stacked = []
    for index in range(len(session.get_outputs())):
        parts = [run[index] for run in runs]
        if len({part.shape for part in parts}) > 1:
            stacked.append(np.concatenate(parts)[np.newaxis])
        else:
            stacked.append(np.stack(parts))
    return stacked


def _top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    # Stacked [S, N, K] classifier scores or [S, N, K, H, W] per-pixel segmentation scores.
    looks_like_scores = reference.ndim in (3, 5) and reference.shape[2] > 1 and reference.dtype.kind == "f"
    if not looks_like_scores:
        return None
    return float(np.mean(reference.argmax(axis=2) == candidate.argmax(axis=2)))


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| in float64 (0 for two zero arrays, inf against a zero one):
    the one relative error every report, fitness and pass check uses."""
    original = np.asarray(reference, dtype=np.float64).ravel()
    error_norm = float(np.linalg.norm(np.asarray(candidate, dtype=np.float64).ravel() - original))
    original_norm = float(np.linalg.norm(original))
    if original_norm:
        return error_norm / original_norm
    return 0.0 if error_norm == 0 else math.inf


def _output_fidelity(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputFidelity:
    original = reference.astype(np.float64).ravel()
    pruned = candidate.astype(np.float64).ravel()
    original_norm = float(np.linalg.norm(original))
    pruned_norm = float(np.linalg.norm(pruned))
    relative_error_ = relative_error(original, pruned)
    if original_norm and pruned_norm:
        cosine = float(original @ pruned) / (original_norm * pruned_norm)
    else:  # two zero vectors agree; a zero and a non-zero one do not
        cosine = 1.0 if original_norm == pruned_norm else 0.0
    return OutputFidelity(
        name=name,
        shape=tuple(reference.shape[1:]),
        max_abs_error=float(np.max(np.abs(pruned - original), initial=0.0)),
        relative_error=relative_error_,
        cosine_similarity=cosine,
        top1_agreement=_top1_agreement(reference, candidate),
    )


def _run_both(original: ModelLike, pruned: ModelLike, inputs: list[dict[str, np.ndarray]],
              providers: list[str] | None) -> tuple[list[str], list[np.ndarray], list[np.ndarray], str]:
    chain = provider_chain(available_providers(providers)[0]) if providers else [CPU]
    original_session = make_session(original, chain)
    pruned_session = make_session(pruned, chain)
    original_outputs = _run_stacked(original_session, inputs)
    pruned_outputs = _run_stacked(pruned_session, inputs)
    if len(original_outputs) != len(pruned_outputs):
        raise ValueError(f"original has {len(original_outputs)} outputs, pruned has {len(pruned_outputs)}")
    names = [output.name for output in original_session.get_outputs()]
    for name, reference, candidate in zip(names, original_outputs, pruned_outputs):
        if reference.shape != candidate.shape:
            raise ValueError(
                f"output {name!r}: original shape {list(reference.shape[1:])}, pruned {list(candidate.shape[1:])}"
            )
    return names, original_outputs, pruned_outputs, original_session.get_providers()[0]


def compare(
    original: ModelLike,
    pruned: ModelLike,
    inputs: list[dict[str, np.ndarray]],
    providers: list[str] | None = None,
) -> FidelityReport:
    """Run both models on `inputs` and measure, per output (matched by position), how far
    the pruned outputs are from the original ones.

    Models are ModelProtos or paths. `providers` default to CPU, the reference; otherwise
    the first usable requested provider is used (see `sessions.available_providers`).
    Raises ValueError when the output count or an output shape differs.
    """
    names, original_outputs, pruned_outputs, provider = _run_both(original, pruned, inputs, providers)
    return _fidelity(names, original_outputs, pruned_outputs, provider, len(inputs))


def _fidelity(names, original_outputs, pruned_outputs, provider: str, feeds: int) -> FidelityReport:
    return FidelityReport(
        samples=feeds,
        provider=provider,
        outputs=[_output_fidelity(*triple) for triple in zip(names, original_outputs, pruned_outputs)],
    )


# --- validation: fidelity and task accuracy on the user's data, and gates ------------------

SYNTHETIC_NOTICE = ("validated on {count} generated random inputs (seed {seed}), not real data: agreement and "
                    "errors on random inputs say little about accuracy on real images; give --inputs (and "
                    "--labels) for a real measure")


@dataclass
class Validation:
    """How the pruned model compares with the original on one data set: fidelity per output, and accuracy
    before/after when labels were given."""
    fidelity: FidelityReport
    samples: int  # batch elements over all feeds
    source: str  # "256 samples from calib.npz" / "4 generated inputs (seed 0)"
    synthetic: bool
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_output: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        """Lowest top-1 agreement over the class-score outputs (None if there are none)."""
        values = [o.top1_agreement for o in self.fidelity.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    @property
    def relative_error(self) -> float:
        """Largest relative error over the outputs."""
        return max((o.relative_error for o in self.fidelity.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "source": self.source, "synthetic": self.synthetic,
                "agreement": self.agreement, "relative_error": self.relative_error,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "accuracy_output": self.accuracy_output, "notes": list(self.notes),
                "fidelity": self.fidelity.to_dict()}


def _class_scores(outputs: list[np.ndarray], names: list[str]) -> tuple[str, np.ndarray] | None:
    """The first output holding class scores ([feeds, batch, classes]), by name."""
    for name, output in zip(names, outputs):
        if output.ndim == 3 and output.shape[2] > 1 and output.dtype.kind == "f":
            return name, output
    return None


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    predictions = scores.argmax(axis=2).reshape(-1)
    return float(np.mean(predictions == labels))


def validate(original: ModelLike, pruned: ModelLike, data=None, labels=None, *, seed: int = 0,
             shapes: dict[str, list[int]] | None = None, samples: int = 4, providers: list[str] | None = None,
             **preprocessing) -> Validation:
    """Compare `pruned` with `original` on `data`, and their accuracy when there are labels.

    `data`: a path (.npz, .npy, image folder, .py data loader), an array, a dict of arrays, a list of feed
    dicts, a `data.Dataset`, or None for `samples` generated random inputs (`seed`, `shapes` for dynamic
    dims) - which the result marks as synthetic. `labels`: class ids (array or .npy/.npz/.txt path); a
    `label(s)` array inside the data is used otherwise. `preprocessing`: image_size, mean, std, layout, color.
    Raises PruneError (`data.DataError`) for data the model cannot take.
    """
    from .data import DataError, Dataset, load_data

    if isinstance(data, Dataset):
        dataset = data
        if labels is not None:
            from .data import _checked_labels, read_labels
            dataset.labels = _checked_labels(read_labels(labels), dataset.samples)
    elif data is None:
        try:
            feeds = make_inputs(original, seed=seed, shapes=shapes, samples=samples)
        except ValueError as err:
            raise DataError(f"cannot generate inputs: {err} (give shapes, or real data)") from None
        dataset = Dataset(feeds, f"{len(feeds)} generated inputs (seed {seed})", synthetic=True)
        if labels is not None:
            raise DataError("labels need real data: give the inputs they label")
    else:
        dataset = load_data(data, original, labels=labels, **preprocessing)
    names, before, after, provider = _run_both(original, pruned, dataset.feeds, providers)
    result = Validation(_fidelity(names, before, after, provider, len(dataset.feeds)), dataset.samples,
                        dataset.source, dataset.synthetic, notes=list(dataset.notes))
    if dataset.synthetic:
        result.notes.append(SYNTHETIC_NOTICE.format(count=len(dataset.feeds), seed=seed))
    if dataset.labels is not None:
        found = _class_scores(before, names)
        if found is None:
            raise DataError("labels given, but no model output holds class scores [batch, classes]")
        name, scores = found
        classes = scores.shape[2]
        if dataset.labels.max(initial=0) >= classes:
            raise DataError(f"labels go up to {dataset.labels.max()}, output {name!r} has {classes} classes")
        result.accuracy_output = name
        result.accuracy_before = _accuracy(scores, dataset.labels)
        result.accuracy_after = _accuracy(after[names.index(name)], dataset.labels)
    return result


@dataclass(frozen=True)
class GateFailure:
    metric: str  # "top-1 agreement", "relative error", "accuracy"
    option: str  # the keyword the threshold came in as: min_agreement, max_rel_error, min_accuracy
    value: float | None
    threshold: float

    def message(self, option_name: str | None = None) -> str:
        """One line naming the metric, its value and the threshold (`option_name`: as the caller spelled it)."""
        name = option_name or self.option
        if self.value is None:
            return f"{self.metric} cannot be measured here, but {name} {self.threshold:g} asks for it"
        side = "below" if self.option.startswith("min") else "above"
        return f"{self.metric} {self.value:.4g} is {side} {name} {self.threshold:g}"


def check_gates(validation: Validation, min_agreement: float | None = None, max_rel_error: float | None = None,
                min_accuracy: float | None = None) -> list[GateFailure]:
    """The gates the validation fails (empty: all passed). A gate whose metric is missing fails."""
    failures = []
    if min_agreement is not None:
        value = validation.agreement
        if value is None or value < min_agreement:
            failures.append(GateFailure("top-1 agreement", "min_agreement", value, min_agreement))
    if max_rel_error is not None:
        value = validation.relative_error
        if not value <= max_rel_error:  # NaN fails
            failures.append(GateFailure("relative error", "max_rel_error", value, max_rel_error))
    if min_accuracy is not None:
        value = validation.accuracy_after
        if value is None or value < min_accuracy:
            failures.append(GateFailure("accuracy", "min_accuracy", value, min_accuracy))
    return failures


def format_validation(validation: Validation) -> str:
    """The fidelity table, then accuracy before -> after when measured."""
    lines = [format_fidelity_table(validation.fidelity).replace(
        f"fidelity over {validation.fidelity.samples} sample(s)", f"fidelity over {validation.source}", 1)]
    if validation.accuracy_before is not None:
        lines.append(f"accuracy ({validation.accuracy_output}, {validation.samples} labelled samples): "
                     f"{validation.accuracy_before:.2%} -> {validation.accuracy_after:.2%} "
                     f"({100 * (validation.accuracy_after - validation.accuracy_before):+.2f} points)")
    return "\n".join(lines)


def format_fidelity_table(report: FidelityReport) -> str:
    """Fixed-width table, one row per output."""
    name_width = max([len("output"), *(len(output.name) for output in report.outputs)])
    shape_width = max([len("shape"), *(len(str(list(output.shape))) for output in report.outputs)])
    header = (
        f"{'output':<{name_width}}  {'shape':<{shape_width}}  {'max abs err':>11}  "
        f"{'rel err':>9}  {'cosine':>8}  {'top-1':>7}"
    )
    lines = [f"fidelity over {report.samples} sample(s) on {report.provider}", header, "-" * len(header)]
    for output in report.outputs:
        top1 = "-" if output.top1_agreement is None else f"{output.top1_agreement:.2%}"
        lines.append(
            f"{output.name:<{name_width}}  {str(list(output.shape)):<{shape_width}}  "
            f"{output.max_abs_error:>11.3e}  {output.relative_error:>9.2e}  "
            f"{output.cosine_similarity:>8.6f}  {top1:>7}"
        )
    return "\n".join(lines)
