"""Build the torchvision model zoo used by the zoo tests.

Exports torchvision CNNs with random (but deterministic) weights to ONNX
through both the TorchScript exporter and the dynamo exporter.  BatchNorm
layers get random affine parameters and running statistics calibrated on the
network's own activations, so that deep networks stay input-sensitive.

torch / torchvision are development dependencies: they are imported only here.

Usage::

    python models/build_zoo.py [--out models/zoo] [--models a,b,...]
        [--exporters torchscript,dynamo] [--size 224] [--force]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "googlenet",
    "squeezenet1_1",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "deeplabv3_mobilenet_v3_large",
]
EXPORTERS = ["torchscript", "dynamo"]
OPSET = {"torchscript": 17, "dynamo": 18}
DEFAULT_OUT = Path(__file__).resolve().parent / "zoo"
INPUT_NAME, OUTPUT_NAME = "input", "output"
CALIBRATION_STEPS, CALIBRATION_BATCH = 4, 8
MIN_INPUT_SENSITIVITY = 1e-2  # relative L2 difference between two inputs' outputs
MAX_ONNX_ERROR = 1e-3  # max |onnx - torch| relative to max |torch|
EXPORT_BATCH = 2  # torch.export specialises size-1 dims, so export with batch 2


class OutTensor(torch.nn.Module):
    """Make a segmentation model return its ``'out'`` tensor instead of a dict."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def seed_of(name: str) -> int:
    """Deterministic per-model seed."""
    return zlib.crc32(name.encode())


def create(name: str) -> torch.nn.Module:
    """Instantiate torchvision model ``name`` with random weights."""
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    if name == "deeplabv3_mobilenet_v3_large":
        seg = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, aux_loss=False
        )
        return OutTensor(seg)
    return torchvision.models.get_model(name, weights=None)


def batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, size: int) -> None:
    """Randomise BN affine parameters and set running stats from own activations.

    Only the BN layers are put in training mode (dropout and stochastic depth
    stay off); momentum=None makes the running statistics a cumulative average.
    """
    model.eval()
    for bn in batchnorms(model):
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.momentum = None
        bn.reset_running_stats()
        bn.train()
    for _ in range(CALIBRATION_STEPS):
        model(torch.randn(CALIBRATION_BATCH, 3, size, size))
    model.eval()


def make_model(name: str, size: int) -> torch.nn.Module:
    """Seeded random model with calibrated BatchNorm, in eval mode."""
    torch.manual_seed(seed_of(name))
    model = create(name)
    calibrate_batchnorm(model, size)
    return model


@torch.no_grad()
def check_input_sensitivity(name: str, model: torch.nn.Module, size: int) -> None:
    """Fail if two different inputs give (nearly) the same output."""
    a = model(torch.randn(1, 3, size, size))
    b = model(torch.randn(1, 3, size, size))
    diff = float((a - b).norm() / a.norm())
    if not diff > MIN_INPUT_SENSITIVITY:
        raise RuntimeError(f"{name}: output is input-insensitive (rel L2 diff {diff:.2e})")


def export(model: torch.nn.Module, exporter: str, path: Path, size: int) -> None:
    """Export ``model`` to ``path`` with a dynamic batch axis."""
    x = torch.randn(EXPORT_BATCH, 3, size, size)
    common = dict(
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET[exporter],
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
            torch.onnx.export(model, (x,), path, dynamo=False, dynamic_axes=axes, **common)
        elif exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},)
            torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=shapes, **common)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")


@torch.no_grad()
def check_onnx(name: str, model: torch.nn.Module, path: Path, size: int) -> None:
    """Fail if onnxruntime (CPU) disagrees with torch; uses a batch of 3."""
    x = torch.randn(3, 3, size, size)
    expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {INPUT_NAME: x.numpy()})
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    if not error < MAX_ONNX_ERROR:
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch (max rel error {error:.2e})")


def onnx_path(name: str, exporter: str, out_dir: Path) -> Path:
    """File name of ``name`` exported by ``exporter``."""
    return Path(out_dir) / f"{name}_{exporter}.onnx"


def build(name: str, exporter: str, out_dir: Path, size: int = 224, force: bool = False) -> Path:
    """Export one model (unless cached) and return the path of the ONNX file."""
    path = onnx_path(name, exporter, out_dir)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = make_model(name, size)
    check_input_sensitivity(name, model, size)
    start = time.perf_counter()
    export(model, exporter, path, size)
    seconds = time.perf_counter() - start
    check_onnx(name, model, path, size)
    update_manifest(path.parent, {path.name: describe(name, exporter, path, seconds)})
    return path


def value_info(value: onnx.ValueInfoProto) -> dict:
    """Name and shape (ints or symbolic names) of a graph input/output."""
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims}


def describe(name: str, exporter: str, path: Path, seconds: float) -> dict:
    """Manifest entry of one exported file."""
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    return {
        "model": name,
        "exporter": exporter,
        "inputs": [value_info(v) for v in model.graph.input],
        "outputs": [value_info(v) for v in model.graph.output],
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "file_bytes": path.stat().st_size,
        "external_data": data.name if data.exists() else None,
        "external_data_bytes": data.stat().st_size if data.exists() else 0,
        "export_seconds": round(seconds, 2),
    }


def update_manifest(out_dir: Path, entries: dict) -> None:
    """Merge ``entries`` into ``<out_dir>/manifest.json``."""
    manifest_path = Path(out_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(entries)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--force", action="store_true", help="rebuild cached files")
    args = parser.parse_args(argv)
    args.models, args.exporters = args.models.split(","), args.exporters.split(",")
    for given, known in ((args.models, MODELS), (args.exporters, EXPORTERS)):
        if unknown := sorted(set(given) - set(known)):
            parser.error(f"unknown {unknown}; choose from {known}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the requested models with the requested exporters."""
    args = parse_args(argv)
    total = time.perf_counter()
    for exporter in args.exporters:
        for name in args.models:
            start = time.perf_counter()
            cached = onnx_path(name, exporter, args.out).exists() and not args.force
            path = build(name, exporter, args.out, args.size, force=args.force)
            status = "cached" if cached else f"{time.perf_counter() - start:6.1f}s"
            print(f"{path.name:45s} {status}", flush=True)
    print(f"total {time.perf_counter() - total:.1f}s")


if __name__ == "__main__":
    main()
