"""Variants of the data-free sensitivity allocation, measured against today's default (issue 15, session 5).

    python benchmarks/sensitivity_variants.py --models mobilenet_v2_imagenet --kinds fused,bn --keep 0.9,0.8 \
        --variants default,cap-0.35,bn-surrogate

The default (`--allocation auto` without data on these models = sensitivity) measures each group's damage
curve on 32 synthetic 1/f-noise images.  Each variant changes one thing, in this process only:

- ``cap-X``: no group loses more than X of its channels (``max_ratio``): a hedge against damage the synthetic
  images do not show (the Fashion-MNIST SE-net loses half of its first convolutions and its SE squeezes);
- ``round-to-1``: channel-exact rounding instead of ``size`` steps;
- ``told-normalisation``: ``--mean``/``--std`` given (the dataset's pixel statistics), so the synthetic images
  are made at the model's input normalisation (without them: ImageNet's for 3 channels, standardised noise else);
- ``seed-N``: other synthetic images (how stable is the allocation?); ``samples-N``: N images instead of 32;
- ``dead-leaves``: occlusion images (random disks of random colours, radii ~ 1/r^3) instead of 1/f noise;
- ``logit-mse``: damage as the squared error of the centred logits over their energy, instead of the KL of the
  softmax;
- ``obs-synthetic-N``: not a sensitivity variant: N synthetic 1/f images handed to ``--calib`` (so the default
  method becomes obs: second-order selection and reconstruction fitted to the noise's statistics);
- ``bn-surrogate``: (BatchNorm-kept exports) damage measured in a copy of the model whose BatchNorms' running
  statistics are re-estimated on the synthetic images, all in one run of a copy that normalises with batch
  statistics, so that every normalised channel has on the synthetic images the mean and spread its BatchNorm
  promises for real data.

Evaluation: top-1 agreement with the unpruned model on `pretrained_quality.py`'s evaluation inputs (``--eval-crops``
crops of the evaluation photos plus the labelled images; the first 1,000 committed Fashion-MNIST test images).
Rows go to stdout as JSON lines; ``--out`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "models" / "pretrained"), str(ROOT.parent / "models" / "trained")]
import pretrained_quality as pq  # noqa: E402

import onnx_prune  # noqa: E402
import onnx_prune.analysis.expected as expected  # noqa: E402
import onnx_prune.methods as methods  # noqa: E402
import onnx_prune.passes.sensitivity as sensitivity  # noqa: E402
from onnx_prune.analysis.layers import attr  # noqa: E402

LIBRARY = {"synthetic_inputs": expected.synthetic_inputs, "output_damage": sensitivity.output_damage,
           "damage_inputs_defaults": sensitivity.damage_inputs.__defaults__,
           "damage_curves": methods.MethodInput.damage_curves}


# ---------------------------------------------------------------- variants of the inputs and the metric


def dead_leaves(rng: np.random.Generator, batch: int, channels: int, height: int, width: int,
                disks: int = 400, smallest: float = 2.0) -> np.ndarray:
    """Pixels in [0, 1]: disks painted back to front, radii from a 1/r^3 density, colours mostly grey."""
    largest = max(height, width) / 3
    rows, cols = np.mgrid[0:height, 0:width]
    out = np.empty((batch, channels, height, width))
    for b in range(batch):
        image = np.broadcast_to(rng.uniform(0, 1, (channels, 1, 1)), (channels, height, width)).copy()
        u = rng.uniform(size=disks)
        radius = 1 / np.sqrt(1 / smallest ** 2 - u * (1 / smallest ** 2 - 1 / largest ** 2))
        centre_r, centre_c = rng.uniform(0, height, disks), rng.uniform(0, width, disks)
        colour = 0.6 * rng.uniform(0, 1, (disks, 1)) + 0.4 * rng.uniform(0, 1, (disks, channels))
        for k in range(disks):
            inside = (rows - centre_r[k]) ** 2 + (cols - centre_c[k]) ** 2 <= radius[k] ** 2
            image[:, inside] = colour[k][:, None]
        out[b] = image
    return out


def dead_leaves_inputs(model, samples=32, batch=8, seed=0, normalization=None, shapes=None) -> list[dict]:
    from onnx_prune.runtime.sessions import input_specs, resolve_input_shapes

    specs = input_specs(model)
    rng = np.random.default_rng(seed)
    feeds, produced = [], 0
    while produced < samples:
        concrete = resolve_input_shapes(specs, shapes, min(batch, samples - produced))
        feed = {}
        for spec in specs:
            n, c, h, w = concrete[spec.name]
            pixels = dead_leaves(rng, n, c, h, w)
            norm = normalization or (expected.IMAGENET_NORMALIZATION if c == 3 else None)
            if norm is None:
                pixels = (pixels - pixels.mean()) / pixels.std()
            else:
                pixels = (pixels - np.reshape(norm[0], (1, -1, 1, 1))) / np.reshape(norm[1], (1, -1, 1, 1))
            feed[spec.name] = pixels.astype(spec.dtype)
            produced_now = n
        feeds.append(feed)
        produced += produced_now
    return feeds


def logit_mse(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    total = 0.0
    for ref, out in zip(reference, outputs):
        ref = ref.astype(np.float64) - ref.mean(1, keepdims=True)
        out = out.astype(np.float64) - out.mean(1, keepdims=True)
        total += float(np.sum((ref - out) ** 2) / max(np.sum(ref ** 2), 1e-30))
    return total


# ---------------------------------------------------------------- the BatchNorm surrogate


def batch_statistics_model(model: onnx.ModelProto, ranks: dict[str, int]) -> tuple[onnx.ModelProto, dict]:
    """A copy in which every BatchNormalization normalises with its input's batch mean and variance and outputs
    them; per BatchNorm node, (mean output, variance output)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)
    nodes, inits, outputs, exposed = [], [], [], {}

    def reduce_mean(tag: str, x: str, axes: list[int]) -> str:
        out = f"{tag}_mean_{x}"
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), f"{tag}_axes_{x}"))
            nodes.append(helper.make_node("ReduceMean", [x, f"{tag}_axes_{x}"], [out], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1))
        return out

    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or node.input[0] not in ranks:
            nodes.append(node)
            continue
        x, rank, tag = node.input[0], ranks[node.input[0]], f"bnsur{index}"
        axes = [0] + list(range(2, rank))
        inits.append(numpy_helper.from_array(np.asarray([1, -1] + [1] * (rank - 2), dtype=np.int64), f"{tag}_shape"))
        inits.append(numpy_helper.from_array(np.asarray(attr(node, "epsilon", 1e-5), dtype=np.float32), f"{tag}_eps"))
        mean = reduce_mean(tag, x, axes)
        nodes += [helper.make_node("Sub", [x, mean], [f"{tag}_c"]),
                  helper.make_node("Mul", [f"{tag}_c", f"{tag}_c"], [f"{tag}_sq"])]
        var = reduce_mean(tag, f"{tag}_sq", axes)
        nodes += [helper.make_node("Add", [var, f"{tag}_eps"], [f"{tag}_ve"]),
                  helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_sd"]),
                  helper.make_node("Div", [f"{tag}_c", f"{tag}_sd"], [f"{tag}_n"]),
                  helper.make_node("Reshape", [node.input[1], f"{tag}_shape"], [f"{tag}_g"]),
                  helper.make_node("Reshape", [node.input[2], f"{tag}_shape"], [f"{tag}_b"]),
                  helper.make_node("Mul", [f"{tag}_n", f"{tag}_g"], [f"{tag}_ng"]),
                  helper.make_node("Add", [f"{tag}_ng", f"{tag}_b"], [node.output[0]])]
        for stat, tensor in (("mean", mean), ("var", var)):
            nodes.append(helper.make_node("Flatten", [tensor], [f"{tag}_{stat}_row"], axis=0))
            outputs.append(helper.make_tensor_value_info(f"{tag}_{stat}_row", TensorProto.FLOAT, None))
        exposed[index] = (f"{tag}_mean_row", f"{tag}_var_row")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    copy.graph.initializer.extend(inits)
    copy.graph.output.extend(outputs)
    del copy.graph.value_info[:]
    return copy, exposed


def batchnorm_surrogate(model: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto | None:
    """`model` with every BatchNorm's running statistics those of its input on `feeds` (None: no BatchNorm;
    statistics two nodes share stay as they are)."""
    from onnx_prune.runtime.sessions import make_session
    from onnx_prune.runtime.shapes import infer_shapes

    shapes = infer_shapes(model)
    ranks = {n.input[0]: len(shapes[n.input[0]]) for n in model.graph.node
             if n.op_type == "BatchNormalization" and shapes.get(n.input[0]) is not None}
    if not ranks:
        return None
    stats_model, exposed = batch_statistics_model(model, ranks)
    joined = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
    wanted = [name for pair in exposed.values() for name in pair]
    values = dict(zip(wanted, make_session(stats_model).run(wanted, joined)))
    surrogate = onnx.ModelProto()
    surrogate.CopyFrom(model)
    by_name = {init.name: init for init in surrogate.graph.initializer}
    uses = {}
    for node in surrogate.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for index, (mean_out, var_out) in exposed.items():
        node = surrogate.graph.node[index]
        for slot, value in ((3, values[mean_out]), (4, values[var_out])):
            name = node.input[slot]  # rewritten in place: the analysis knows the statistics by name
            if name in by_name and uses[name] == 1:
                by_name[name].CopyFrom(numpy_helper.from_array(value.reshape(-1).astype(np.float32), name))
    return surrogate


def surrogate_damage_curves(self, allocator, select=None):
    """`MethodInput.damage_curves`, measured in the BatchNorm surrogate on the same synthetic images."""
    feeds, source = self.damage_feeds()
    if source != "synthetic":
        return LIBRARY["damage_curves"](self, allocator, select)
    surrogate = batchnorm_surrogate(self.prepared.model, feeds)
    if surrogate is None:
        return LIBRARY["damage_curves"](self, allocator, select)
    original = self.prepared
    self.prepared = replace(original, model=surrogate)
    try:
        return LIBRARY["damage_curves"](self, allocator, select)
    finally:
        self.prepared = original


def use(variant: str, model_file: Path | None = None) -> dict:
    """Put the library back, then apply `variant` (for `model_file`); returns the prune() keywords it needs."""
    expected.synthetic_inputs = LIBRARY["synthetic_inputs"]
    sensitivity.output_damage = LIBRARY["output_damage"]
    sensitivity.damage_inputs.__defaults__ = LIBRARY["damage_inputs_defaults"]
    methods.MethodInput.damage_curves = LIBRARY["damage_curves"]
    if variant == "default":
        return {}
    if variant.startswith("cap-"):
        return {"max_ratio": float(variant[4:])}
    if variant == "round-to-1":
        return {"round_to": 1}
    if variant.startswith("seed-"):
        return {"seed": int(variant[5:])}
    if variant.startswith("samples-"):
        sensitivity.damage_inputs.__defaults__ = (int(variant[8:]),) + LIBRARY["damage_inputs_defaults"][1:]
        return {}
    if variant == "dead-leaves":
        expected.synthetic_inputs = dead_leaves_inputs
        return {}
    if variant == "logit-mse":
        sensitivity.output_damage = logit_mse
        return {}
    if variant == "bn-surrogate":
        methods.MethodInput.damage_curves = surrogate_damage_curves
        return {}
    if variant.startswith("obs-synthetic-"):
        return {"calib": synthetic_calibration(model_file, int(variant[len("obs-synthetic-"):]))}
    raise SystemExit(f"unknown variant {variant!r}")


def normalisation(model: str) -> dict:
    """--mean/--std of `model`'s training data, as prune() keywords."""
    use("default")
    if model.startswith("fmnist_"):
        import fashion_mnist

        mean, std = (fashion_mnist.MEAN,), (fashion_mnist.STD,)
    else:
        import pretrained_models

        mean, std = pretrained_models.INPUT_NORMALISATION[model]
    return {"mean": ",".join(map(str, mean)), "std": ",".join(map(str, std))}


def synthetic_calibration(path: Path, samples: int) -> str:
    """An .npz of `samples` synthetic 1/f images for the model at `path` (feeds of 32), in a temporary folder."""
    import tempfile

    model = onnx.load(str(path), load_external_data=False)
    feeds = expected.synthetic_inputs(model, samples=samples, batch=32, seed=0)
    arrays = {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]}
    out = Path(tempfile.mkdtemp(prefix="synthetic_calib_")) / f"{path.stem}_{samples}.npz"
    np.savez(out, **arrays)
    return str(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet_v2_imagenet")
    parser.add_argument("--kinds", default="fused,bn")
    parser.add_argument("--keep", default="0.9,0.8")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--eval-crops", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        data = pq.Data(model, args.eval_crops)
        for kind in pq.model_kinds(model, args.kinds.split(",")):
            path = pq.model_path(model, kind)
            reference = pq.predict(path, data.x)
            for keep in [float(k) for k in args.keep.split(",")]:
                for variant in args.variants.split(","):
                    options = use(variant, path) if variant != "told-normalisation" else normalisation(model)
                    start = time.time()
                    pruned, report = onnx_prune.prune(str(path), target_macs=keep, progress=False, **options)
                    row = {"model": model, "kind": kind, "keep": keep, "variant": variant,
                           **pq.measure(reference, pq.predict(pruned, data.x), data.labels),
                           "macs": round(report.macs_after / report.macs_before, 3),
                           "seconds": round(time.time() - start)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    use("default")
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
