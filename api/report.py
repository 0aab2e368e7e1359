"""What a prune did, for people: a one-screen summary, requested against achieved, a per-group table, plots.

Everything here reads plain data (a `PruneReport` or its JSON dict, a `Validation`, two models) and returns
text or writes a picture; nothing here changes a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def human(count: float | int | None, digits: int = 3) -> str:
    """A count with a K/M/G/T suffix and `digits` significant digits: 272474 -> '272 K', 41_000_000 -> '41.0 M'."""
    if count is None or (isinstance(count, float) and not math.isfinite(count)):
        return "?"
    for scale, unit in UNITS:
        if abs(count) >= scale:
            value = count / scale
            decimals = max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0)
            return f"{value:.{decimals}f} {unit}"
    return f"{count:g}" if isinstance(count, float) else str(count)


def _as_dict(report) -> dict:
    return report if isinstance(report, dict) else report.to_dict()


def _change(before, after) -> str:
    if not before:
        return "n/a"
    return f"{100 * (after / before - 1):+.1f}%"


def target_record(report) -> dict:
    """Requested against achieved: the pipeline's record when it made one, else computed from the counts."""
    data = _as_dict(report)
    record = dict(data.get("details", {}).get("target") or {})
    if data.get("macs_before"):
        record.setdefault("macs_kept", data["macs_after"] / data["macs_before"])
    if data.get("params_before"):
        record.setdefault("params_kept", data["params_after"] / data["params_before"])
    if data.get("channels_before"):
        record.setdefault("channels_removed", 1 - data["channels_after"] / data["channels_before"])
    options = data.get("options", {})
    if "kind" not in record:
        for kind, key in (("macs", "target_macs"), ("params", "target_params"), ("ratio", "ratio")):
            if options.get(key) is not None:
                record.update(kind=kind, value=options[key])
                break
    return record


def target_lines(report) -> list[str]:
    """'requested ... achieved ...' in the target's unit, then MACs and params kept, every time."""
    record = target_record(report)
    kind, value = record.get("kind"), record.get("value")
    lines = []
    if kind in ("macs", "params") and value is not None:
        noun = "MACs" if kind == "macs" else "params"
        achieved = record.get(f"{kind}_kept")
        shown = "unknown" if achieved is None else f"{achieved:.1%}"
        gap = "" if achieved is None else f" ({100 * (achieved - value):+.1f} points)"
        lines.append(f"target: keep {value:.1%} of {noun} requested, {shown} achieved{gap}")
    elif kind == "ratio" and value is not None:
        achieved = record.get("channels_removed")
        shown = "unknown" if achieved is None else f"{achieved:.1%}"
        lines.append(f"target: remove {value:.1%} of channels requested, {shown} of all channels removed")
    elif kind == "latency" and value is not None:
        lines.append(f"target: {record.get('requested', f'latency {value}')} requested, "
                     f"{record.get('achieved', 'unknown')} achieved")
    kept = [f"{noun} kept {record[key]:.1%}" for noun, key in (("MACs", "macs_kept"), ("params", "params_kept"))
            if record.get(key) is not None]
    if kept:
        lines.append("achieved: " + ", ".join(kept))
    if record.get("limited_by"):
        lines.append(f"the target was not reached: {record['limited_by']}")
    details = _as_dict(report).get("details", {})
    chosen = details.get("method")
    if isinstance(chosen, dict) and chosen.get("auto"):  # recorded where --calib data made auto choose
        lines.append(f"method: auto -> {chosen['auto']} ({chosen['why']})")
    sensitivity = details.get("sensitivity", {})
    hedged = (f"at most {sensitivity['max_removed']:.0%} of a group"
              + (" per step" if details.get("steps") else "")) if sensitivity.get("hedged") else ""
    if details.get("allocation", {}).get("why"):  # what "auto" became, and why
        lines.append(f"allocation: {details['allocation']['why']}" + (f"; {hedged}" if hedged else ""))
    elif hedged:
        lines.append(f"allocation: sensitivity on synthetic images; {hedged}")
    if details.get("steps"):
        lines.append("steps: " + " -> ".join(f"{s['keep']:.0%}" for s in details["steps"]) + " of the original's "
                     + ("MACs" if details["steps"][0]["kind"] == "macs" else "params"))
    rounding = rounding_line(_as_dict(report).get("options", {}).get("round_to"))
    return lines + ([rounding] if rounding else [])


def rounding_line(round_to) -> str | None:
    """How kept counts were rounded (--round-to), in words; None when they were not."""
    from onnx_prune.passes.allocate import HEAVY_GROUP_MACS, MAX_SIZE_STEP, SIZE_RULE, SIZE_STEP

    if round_to == SIZE_RULE:
        return (f"rounding (--round-to size): multiples of {SIZE_STEP} ({MAX_SIZE_STEP} from {8 * MAX_SIZE_STEP} "
                f"channels) in groups whose layers do >= {human(HEAVY_GROUP_MACS)} MACs per sample, none in lighter "
                "groups")
    if round_to == "auto":
        return "rounding (--round-to auto): the fastest widths of the latency table"
    if isinstance(round_to, int) and round_to > 1:
        return f"rounding (--round-to {round_to}): multiples of {round_to}"
    return None


def cost_line(report) -> str:
    data = _as_dict(report)
    return (f"channels {data['channels_before']} -> {data['channels_after']}   "
            f"MACs {human(data['macs_before'])} -> {human(data['macs_after'])} "
            f"({_change(data['macs_before'], data['macs_after'])})   "
            f"params {human(data['params_before'])} -> {human(data['params_after'])} "
            f"({_change(data['params_before'], data['params_after'])})")


def validation_lines(validation) -> list[str]:
    """Agreement, error and accuracy in three short lines (`validation`: a Validation or its dict)."""
    if validation is None:
        return ["not validated"]
    data = validation if isinstance(validation, dict) else validation.to_dict()
    agreement = data.get("agreement")
    lines = [f"validated on {data['source']}" + (" (synthetic)" if data.get("synthetic") else "") + ": "
             + (f"top-1 agreement {agreement:.2%}, " if agreement is not None else "")
             + f"max relative error {data['relative_error']:.3g}"]
    if data.get("accuracy_before") is not None:
        lines.append(f"accuracy {data['accuracy_before']:.2%} -> {data['accuracy_after']:.2%} "
                     f"({100 * (data['accuracy_after'] - data['accuracy_before']):+.2f} points)")
    return lines


def summary(report, validation=None) -> str:
    """One screen: what was pruned how, cost before -> after, requested vs achieved, fidelity and accuracy.

    `report`: a PruneReport or its dict; `validation`: a Validation or its dict (default: the report's own)."""
    data = _as_dict(report)
    if validation is None:
        validation = data.get("validation") if isinstance(report, dict) else getattr(report, "validation", None)
    options = data.get("options", {})
    method = options.get("method", "prune")
    how = method + (f", criterion {options['criterion']}" if method in ("prune", "similarity") and
                    options.get("criterion") else "")
    how += ", repaired" if options.get("repair") else ""
    lines = [f"{data.get('source', '?')}: {how}", cost_line(data), *target_lines(data), *validation_lines(validation)]
    return "\n".join(lines)


# --- per-group changes ---------------------------------------------------------------------------


@dataclass
class GroupChange:
    """One channel group of the original, before and after."""
    id: int
    producers: list[str]
    channels_before: int
    channels_after: int | None  # None: its producers are gone from the result (e.g. replaced)
    mac_share_before: float  # of the original's MACs
    mac_share_after: float | None  # of the original's MACs, so the column sums to the MACs kept
    frozen: int
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _output_channels(model, node_name: str) -> int | None:
    """Output channels of a producer node in `model`, read off its weight's shape."""
    from onnx import helper

    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None or len(node.input) < 2:
        return None
    weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    if weight is None:
        return None
    dims = list(weight.dims)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return dims[0]
    if node.op_type == "ConvTranspose":
        return dims[1] * attrs.get("group", 1)
    if node.op_type == "Gemm":
        return dims[0] if attrs.get("transB", 0) else dims[-1]
    if node.op_type == "MatMul":
        return dims[-1]
    return None


def group_changes(original, pruned) -> list[GroupChange]:
    """Each channel group of `original` (a path, ModelProto or prepared model) with its channel count and MAC
    share in `pruned`, matched by producer node name (the rewrite keeps names)."""
    from onnx_prune.pipeline import analyze
    from onnx_prune.runtime.cost import count_cost
    from onnx_prune.runtime.io import load

    if not hasattr(pruned, "graph"):
        pruned = load(pruned).model
    before = analyze(original)
    total = before.macs or 0
    try:
        after_macs = {name: c.macs for name, c in count_cost(pruned).per_node.items()}
    except ValueError:  # dynamic spatial dims: MACs unknown
        after_macs = None
    rows = []
    for group in before.groups:
        after_counts = [_output_channels(pruned, p) for p in group.producers]
        after = next((c for c in after_counts if c is not None), None)
        share_after = None
        if after_macs is not None and total and after is not None:
            share_after = sum(after_macs.get(p, 0) for p in group.producers) / total
        rows.append(GroupChange(group.id, list(group.producers), group.size, after, group.mac_share, share_after,
                                group.frozen, group.reasons[0] if group.reasons else ""))
    return rows


def format_group_changes(rows: list[GroupChange], limit: int | None = None) -> str:
    """A fixed-width table: producers, channels before -> after, MAC share before -> after, frozen reason."""
    def short(names: list[str]) -> str:
        text = names[0] if names else "?"
        text = text if len(text) <= 38 else "..." + text[-35:]
        return text + (f" (+{len(names) - 1})" if len(names) > 1 else "")

    shown = rows if limit is None else rows[:limit]
    table = [[str(r.id), short(r.producers),
              f"{r.channels_before} -> {'?' if r.channels_after is None else r.channels_after}",
              f"{100 * r.mac_share_before:.1f}% -> "
              + ("?" if r.mac_share_after is None else f"{100 * r.mac_share_after:.1f}%"),
              (f"{r.frozen} frozen: " + r.reason[:50]) if r.frozen else ""] for r in shown]
    header = ["id", "producers", "channels", "MAC share", "frozen because"]
    widths = [max(len(x) for x in column) for column in zip(header, *table)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in table]
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more groups")
    return "\n".join(line.rstrip() for line in lines)


# --- plots ---------------------------------------------------------------------------------------

STYLES = [("#1f77b4", "o"), ("#d62728", "s"), ("#2ca02c", "^"), ("#9467bd", "D"), ("#ff7f0e", "v"),
          ("#17becf", "P"), ("#8c564b", "X"), ("#e377c2", "*")]  # distinct colour and marker per series


def report_label(data: dict) -> str:
    """A short legend label for a report: method (criterion, repair) at its target."""
    options = data.get("options", {})
    method = options.get("method", "prune")
    label = method if method not in ("prune", "similarity") else f"{method} {options.get('criterion', '')}".strip()
    if options.get("repair"):
        label += "+repair"
    record = target_record(data)
    if record.get("macs_kept") is not None:
        label += f" @ {record['macs_kept']:.0%} MACs"
    return label


def _quality(data: dict) -> tuple[float | None, str]:
    validation = data.get("validation") or {}
    if validation.get("accuracy_after") is not None:
        return validation["accuracy_after"], "accuracy"
    if validation.get("agreement") is not None:
        return validation["agreement"], "top-1 agreement with the original"
    return None, ""


def plot_reports(reports: list[dict], path, labels: list[str] | None = None) -> None:
    """Channels kept per layer (one series per report), and with several reports accuracy (or agreement)
    against the share of MACs kept. Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        from onnx_prune.errors import PruneError
        raise PruneError("plotting needs matplotlib: pip install 'onnx-prune[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [report_label(r) for r in reports]
    if len(reports) > len(STYLES):
        from onnx_prune.errors import PruneError
        raise PruneError(f"at most {len(STYLES)} reports per plot (got {len(reports)}): more series are unreadable")
    curve = len(reports) > 1 and any(_quality(r)[0] is not None for r in reports)
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(13 if curve else 9, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if curve else None)
    ax = axes[0][0]
    for data, label, (colour, marker) in zip(reports, labels, STYLES):
        groups = _plot_groups(data)
        ax.plot(range(len(groups)), [kept for _, kept in groups], color=colour, marker=marker, markersize=4,
                linewidth=1.2, label=label)
    sizes = [size for size, _ in _plot_groups(reports[0])]
    ax.plot(range(len(sizes)), sizes, color="0.55", linestyle="--", linewidth=1, label="original")
    ax.set_xlabel("channel group (graph order)")
    ax.set_ylabel("channels")
    ax.set_title("channels kept per layer")
    ax.grid(alpha=0.3)
    if curve:
        qa = axes[0][1]
        metric = ""
        for data, label, (colour, marker) in zip(reports, labels, STYLES):
            value, metric = _quality(data) if _quality(data)[0] is not None else (None, metric)
            kept = target_record(data).get("macs_kept")
            if value is not None and kept is not None:
                qa.plot([100 * kept], [100 * value], color=colour, marker=marker, markersize=8, linestyle="none")
        before = next(((r.get("validation") or {}).get("accuracy_before") for r in reports
                       if (r.get("validation") or {}).get("accuracy_before") is not None), None)
        if before is not None and metric == "accuracy":  # the unpruned model, for reference
            qa.plot([100], [100 * before], color="0.4", marker="*", markersize=12, linestyle="none")
            qa.annotate("original", (100, 100 * before), textcoords="offset points", xytext=(-8, -16),
                        ha="right", color="0.4")
        qa.set_xlabel("MACs kept (%)")
        qa.set_ylabel(f"{metric} (%)")
        qa.set_title(f"{metric} against MACs kept")
        qa.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_groups(data: dict) -> list[tuple[int, int]]:
    """(channels before, after) per group, from the report's group changes or its groups."""
    changes = data.get("group_changes")
    if changes:
        return [(c["channels_before"], c["channels_after"] if c["channels_after"] is not None else 0)
                for c in changes]
    return [(g["size"], g["kept"]) for g in data.get("groups", [])]
