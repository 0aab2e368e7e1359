"""How far the pruned model's outputs drift from the original's, output by output."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

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
    """Feeds from an .npz of input name -> array, one dict per sample.

    An array with one axis more than the model input is a stack of samples along
    axis 0; all inputs must then hold the same number of samples. Arrays are cast to
    the input's dtype where numpy calls that safe or same-kind. Raises ValueError for a
    missing or unknown input name, a wrong rank, a fixed dim that differs, or a bad dtype.
    """
    specs = input_specs(model)
    stacks: dict[str, np.ndarray] = {}
    with np.load(path) as archive:
        names = [spec.name for spec in specs]
        missing = [name for name in names if name not in archive.files]
        unknown = [name for name in archive.files if name not in names]
        if missing or unknown:
            raise ValueError(
                f"{os.fspath(path)}: missing arrays for {missing}, unknown arrays {unknown}; model inputs are {names}"
            )
        for spec in specs:
            array = archive[spec.name]
            rank = array.ndim if spec.dims is None else len(spec.dims)
            if array.ndim == rank:
                array = array[np.newaxis]
            elif array.ndim != rank + 1:
                raise ValueError(
                    f"{os.fspath(path)}: {spec.name!r} has rank {array.ndim}; the model input has rank "
                    f"{rank} ({rank + 1} with a leading sample axis)"
                )
            for axis, dim in enumerate(spec.dims or ()):
                if isinstance(dim, int) and array.shape[axis + 1] != dim:
                    raise ValueError(
                        f"{os.fspath(path)}: {spec.name!r} dim {axis} is {array.shape[axis + 1]}, the model fixes it to {dim}"
                    )
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise ValueError(f"{os.fspath(path)}: {spec.name!r} is {array.dtype}, the model wants {spec.dtype}")
            stacks[spec.name] = array.astype(spec.dtype, copy=False)
    counts = {name: len(stack) for name, stack in stacks.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{os.fspath(path)}: inputs hold different numbers of samples: {counts}")
    sample_count = next(iter(counts.values()), 0)
    return [{name: stack[index] for name, stack in stacks.items()} for index in range(sample_count)]


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


def _run_stacked(session, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each output, samples stacked along a new axis 0."""
    runs = [session.run(None, feed) for feed in inputs]
    return [np.stack([run[index] for run in runs]) for index in range(len(session.get_outputs()))]


def _top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    # Stacked [S, N, K] classifier scores or [S, N, K, H, W] per-pixel segmentation scores.
    looks_like_scores = reference.ndim in (3, 5) and reference.shape[2] > 1 and reference.dtype.kind == "f"
    if not looks_like_scores:
        return None
    return float(np.mean(reference.argmax(axis=2) == candidate.argmax(axis=2)))


def _output_fidelity(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputFidelity:
    original = reference.astype(np.float64).ravel()
    pruned = candidate.astype(np.float64).ravel()
    error_norm = float(np.linalg.norm(pruned - original))
    original_norm = float(np.linalg.norm(original))
    pruned_norm = float(np.linalg.norm(pruned))
    if original_norm:
        relative_error = error_norm / original_norm
    else:
        relative_error = 0.0 if error_norm == 0 else math.inf
    if original_norm and pruned_norm:
        cosine = float(original @ pruned) / (original_norm * pruned_norm)
    else:  # two zero vectors agree; a zero and a non-zero one do not
        cosine = 1.0 if original_norm == pruned_norm else 0.0
    return OutputFidelity(
        name=name,
        shape=tuple(reference.shape[1:]),
        max_abs_error=float(np.max(np.abs(pruned - original), initial=0.0)),
        relative_error=relative_error,
        cosine_similarity=cosine,
        top1_agreement=_top1_agreement(reference, candidate),
    )


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
    return FidelityReport(
        samples=len(inputs),
        provider=original_session.get_providers()[0],
        outputs=[_output_fidelity(*triple) for triple in zip(names, original_outputs, pruned_outputs)],
    )


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
