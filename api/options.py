"""Everything `prune` can be told, each option once: its default, its CLI flag and its help live in the field.

The CLI builds its parser from these fields (`cli_spec`), so a new option is one new field here.
Metadata keys: ``help`` (text, required), ``group`` (CLI section), ``flag`` (defaults to ``--name-with-dashes``),
``choices``, ``metavar``, ``action`` ("store_true" for flags that switch something on, "store_false" with a
``flag`` like ``--no-hash``), ``nargs``, ``cli`` (False: API only).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


ROUND_RULES = ("size", "auto")  # --round-to values that are not a number


def round_to_value(text: str) -> int | str:
    """--round-to: a positive integer, "size" or "auto"."""
    return text if text in ROUND_RULES else int(text)


def option(default, help: str, **meta):
    """A dataclass field with its CLI description."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(meta, help=help))
    return field(default=default, metadata=dict(meta, help=help))


TARGET = "target (one of; default --ratio 0.3)"
CHOICE = "what to remove"
METHOD = "method options"
BLEND = "--criterion blend: criteria clustered, their weights searched"
DATA = "data"
SPEED = "speed: where latency is measured (--target-latency, the never-slower check)"


@dataclass
class PruneOptions:
    """Everything `prune` can be told; the CLI maps its flags one to one (generated from these fields)."""
    ratio: float | None = option(None, "share of channels to remove, in [0, 1): per group (uniform) or overall "
                                 "(global)", group=TARGET, metavar="R")
    target_macs: float | None = option(None, "keep this fraction of the MACs (within 1%%)", group=TARGET,
                                       metavar="F")
    target_params: float | None = option(None, "keep this fraction of the parameters", group=TARGET, metavar="F")
    target_latency: float | None = option(None, "keep this fraction of the original's latency, measured with "
                                          "onnxruntime on --provider/--threads/--latency-batch", group=TARGET,
                                          metavar="F")
    criterion: str = option("bnvar", "channel saliency: bnvar (default: the output error a removal adds after "
                            "compensation, from BatchNorm statistics, --calib data or synthetic inputs), l1, l2, "
                            "fpgm, bn, random, similarity, nystrom (data-free) or activation, apoz (need --calib), "
                            "or blend", group=CHOICE)
    bn_weighting: str = option("gamma", "how a BatchNorm after a layer enters magnitude criteria: gamma (raw "
                               "filters x |gamma|, default) or folded (gamma / running sigma folded in)",
                               group=CHOICE, choices=["gamma", "folded"])
    aggregate: str = option("domino-o", "how scores of coupled layers combine: domino-o (sum over producers, "
                            "default), domino-io (and consumers), mean, max, first (first producer only)",
                            group=CHOICE)
    normalize: bool = option(False, "divide scores by the number of weights a channel's removal deletes",
                             group=CHOICE, action="store_true")
    allocation: str = option("auto", "uniform: the same share from every group; global: one ranking of all "
                             "channels; sensitivity: each group pruned alone at a few shares, the damage to the "
                             "outputs measured (on --calib data, else on synthetic images), least damage per MAC "
                             "removed first; auto (default): sensitivity with --calib; without data, sensitivity on synthetic images "
                             "for --method prune with a MAC/parameter target where measuring costs at most 2 TMAC of "
                             "evaluation, else uniform (the report says which)",
                             group=CHOICE, choices=["auto", "uniform", "global", "sensitivity"])
    steps: int = option(1, "reach a --target-macs/--target-params in this many prunes, each of the previous "
                        "result at evenly spaced shares of the original (e.g. 3 steps to 67%%: 89%%, 78%%, 67%%); "
                        "each step re-measures statistics, damage and recalibration (default 1)", group=CHOICE,
                        metavar="K")
    max_ratio: float = option(1.0, "never remove more than this share of a group (default 1: no limit; but "
                              "damage curves measured on synthetic images, the data-free sensitivity allocation, "
                              "remove at most 0.35 of a group for a MAC or parameter target where the target "
                              "allows it; any value below 1 replaces that)",
                              group=CHOICE, metavar="R")
    round_to: int | str = option("size", "round each kept channel count up to a multiple of N; 'size' (default): "
                                 "to a multiple of 8 (16 in groups of 128 channels or more; for slots a grouped "
                                 "conv shares, so that the tensor's width is one) where the group's layers do at "
                                 "least 1 M MACs per sample (without a MAC count: groups of 32 channels or more), "
                                 "not at all in lighter groups or where no narrower count aligns, so that CPU "
                                 "kernels keep their vector blocks where the time is spent; 'auto': the fastest width "
                                 "at or just below it per the measured latency table (the default with "
                                 "--target-latency)", group=CHOICE, metavar="N|size|auto", type=round_to_value)
    exclude: list = option([], "node names (shell wildcards allowed) whose channel groups are left whole",
                           group=CHOICE, nargs="+", metavar="NODE")
    protect_first: bool = option(False, "also leave whole the groups of layers that read the graph input (the "
                                 "stem)", group=CHOICE, action="store_true")
    method: str = option("auto", "how channels go: auto (default): obs with --calib (unless --repair or another "
                         "--criterion is asked for), prune without; prune (drop the lowest-scoring), obs (group OBS "
                         "selection and reconstruction on --calib data), similarity (drop one of each "
                         "most similar pair), centripetal (k-means merge), red (hash + merge + prune + uneven "
                         "depthwise separation), hash (weight hashing alone)", group=CHOICE)
    compensate: bool = option(True, "do not replace removed channels by their expected value (by default each "
                              "removed channel's mean, from BatchNorm statistics, --calib data or synthetic 1/f-noise "
                              "inputs, is folded into its consumers' biases)", group=METHOD, action="store_false",
                              flag="--no-compensate")
    synthetic_statistics: bool = option(False, "where neither BatchNorm nor --calib gives channel means, measure "
                                        "them on synthetic 1/f-noise images and compensate with them too (off: "
                                        "measured to hurt as often as help)", group=METHOD, action="store_true")
    restore_variance: bool = option(False, "with compensation: scale each reduced group's kept (or merged) "
                                    "channels at the consumers so that the variance the group contributes to "
                                    "their outputs stays, where BatchNorm statistics or --calib data give the "
                                    "variances (the report gives each group's scale)", group=METHOD,
                                    action="store_true")
    merge_neighbours: bool = option(False, "with --method similarity: fold a removed channel into its most "
                                    "similar kept one", group=METHOD, action="store_true")
    medoid: bool = option(False, "with --method centripetal: keep each cluster's medoid instead of its centroid",
                          group=METHOD, action="store_true")
    repair: bool = option(False, "refit the layers reading reduced channels by least squares on --calib data",
                          group=METHOD, action="store_true")
    ridge: float = option(1e-3, "repair: ridge strength towards the current weights", group=METHOD)
    recalibrate: bool = option(True, "with --calib, do not give each layer's output channels back the "
                               "original's mean and spread (by default a per-channel scale and shift folded into "
                               "each Conv/Gemm, in graph order, kept only if it lowers the damage on held-out "
                               "calibration samples)", group=METHOD, action="store_false", flag="--no-recalibrate")
    bandwidth: float = option(0.005, "red/hash: KDE bandwidth (default 0.005)", group=METHOD)
    hash_weights: bool = option(True, "red: merge without hashing", group=METHOD, action="store_false",
                                flag="--no-hash")
    per_neuron: bool = option(False, "red/hash: one KDE per output neuron", group=METHOD, action="store_true")
    merge_tol: float = option(0.0, "red: merge channels within this relative distance (default 0: identical "
                              "only)", group=METHOD)
    max_merge_tol: float = option(0.5, "red with a target: raise the merge tolerance up to this until merging "
                                  "alone reaches the target; the rest is pruned (default 0.5: merging channels "
                                  "further apart lost to pruning on every pretrained model measured)", group=METHOD)
    separate_depthwise: bool = option(True, "red: no uneven depthwise separation", group=METHOD,
                                      action="store_false", flag="--no-separate")
    separate_by_latency: bool = option(False, "red: separate a conv only where it also measures no slower on "
                                       "--provider (timing-based, so the bytes may differ between runs; default: "
                                       "decided by MACs alone)", group=METHOD, action="store_true")
    landmarks: int | None = option(None, "Nystrom landmark count (default: the filter prototypes' rank, which is "
                                   "exact; fewer approximate, with the measured error in the report)",
                                   group=METHOD, metavar="M")
    generations: int = option(10, "differential-evolution generations (10)", group=BLEND)
    population: int = option(16, "candidates per generation (16)", group=BLEND)
    workers: int = option(1, "processes evaluating candidates (1)", group=BLEND)
    time_budget: float | None = option(None, "stop searching after this long", group=BLEND, metavar="SECONDS")
    blend_weights: str | None = option(None, "re-apply weights saved with --blend-report", group=BLEND,
                                       metavar="FILE")
    blend_threshold: float = option(0.2, "criteria with 1 - Spearman rho below this share a cluster (0.2)",
                                    group=BLEND)
    blend_metric: str = option("auto", "fitness: top-1 agreement with the original where outputs are class "
                               "scores, else relative output error (auto)", group=BLEND,
                               choices=["auto", "agreement", "error"])
    calib: str | None = option(None, "calibration data for the activation and apoz criteria and for --repair: "
                               ".npz (N samples along the batch axis), .npy, an image folder or a .py data loader",
                               group=DATA, metavar="DATA")
    seed: int = option(0, "seed for generated inputs and seeded criteria (default 0)", group=DATA)
    progress: bool = option(True, "progress lines of long steps (sensitivity curves, blend search, latency "
                            "tables) on stderr; the CLI's --quiet turns them off", cli=False)
    provider: str = option("cpu", "onnxruntime execution provider to measure latency on: cpu, cuda, tensorrt "
                           "(default cpu)", group=SPEED)
    threads: int | None = option(None, "onnxruntime intra-op threads for latency measurements (default: "
                                 "onnxruntime's)", group=SPEED, metavar="N")
    latency_batch: int = option(1, "batch size latency is measured at (default 1)", group=SPEED, metavar="B")
    latency_table: str | None = option(None, "latency table JSON: read when it exists (must match model and "
                                       "settings), else measured and written there (reproducible runs)",
                                       group=SPEED, metavar="FILE")
    min_speedup: float | None = option(None, "fail (exit 4) when the measured speed-up over the original is "
                                       "below S", group=SPEED, metavar="S")
    image_size: str | None = option(None, "image folders: resize to H,W (default: the model's input size)",
                                    group=DATA, metavar="H,W")
    mean: str | None = option(None, "image pixels (scaled to [0, 1]): subtract this, one value or one per channel",
                              group=DATA, metavar="M[,M,M]")
    std: str | None = option(None, "image pixels: then divide by this, one value or one per channel",
                             group=DATA, metavar="S[,S,S]")
    layout: str | None = option(None, "the model's image layout (default: guessed from its input shape)",
                                group=DATA, choices=["NCHW", "NHWC"])
    color: str | None = option(None, "channel order the model wants (default: GRAY for 1 channel, else RGB)",
                               group=DATA, choices=["RGB", "BGR", "GRAY"])

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: getattr(cls(), f.name) for f in fields(cls)}

    def progress_printer(self):
        """Where long steps write their progress lines: stderr, or nowhere (None) without `progress`."""
        if not self.progress:
            return None
        import sys

        return lambda line: print(line, file=sys.stderr, flush=True)


def cli_spec(cls=PruneOptions) -> list[tuple[str, str, dict]]:
    """(field name, flag, argparse keywords) for every CLI option of `cls`, in declaration order."""
    spec = []
    defaults = cls()
    for f in fields(cls):
        meta = dict(f.metadata)
        if not meta or meta.get("cli", True) is False:
            continue
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        meta.pop("group", None)
        kwargs = {k: meta[k] for k in ("help", "choices", "metavar", "action", "nargs") if k in meta}
        kwargs["dest"] = f.name
        kwargs["default"] = getattr(defaults, f.name)
        if "action" not in kwargs:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            for name, conv in (("float", float), ("int", int)):
                if kind.startswith(name):
                    kwargs["type"] = conv
        if "type" in meta:
            kwargs["type"] = meta["type"]
        spec.append((f.name, flag, kwargs))
    return spec


def cli_groups(cls=PruneOptions) -> dict[str, str]:
    """Field name -> CLI section title."""
    return {f.name: f.metadata.get("group", "") for f in fields(cls) if f.metadata}
