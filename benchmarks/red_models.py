"""The models the RED benchmarks measure, and how a compressed model is scored against its original.

The trained Fashion-MNIST nets of ``models/trained`` (``<name>.onnx`` + ``fmnist_eval.npz``) when present:
accuracy on the 2,000 evaluation images, top-1 agreement and relative error of the logits against the
original.  Otherwise zoo models (random weights, ``models/zoo``): relative error and top-1 agreement on
random inputs only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_prune.runtime.fidelity import make_inputs

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "trained"
ZOO = ROOT / "models" / "zoo"
ZOO_MODELS = ("resnet18_torchscript", "mobilenet_v2_torchscript")
BATCH = 500


@dataclass
class Subject:
    name: str
    path: Path
    inputs: np.ndarray              # stacked model inputs [N, ...]
    labels: np.ndarray | None       # class labels where the data has them
    reference: np.ndarray           # the original model's outputs

    @property
    def kind(self) -> str:
        return "trained" if self.labels is not None else "zoo (random weights)"


def outputs(model, inputs: np.ndarray) -> np.ndarray:
    """First output of a model (path or ModelProto) over `inputs`, in batches, onnxruntime CPU."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i: i + BATCH]})[0] for i in range(0, len(inputs), BATCH)])


def subjects(trained_dir: Path = TRAINED, zoo_models=ZOO_MODELS, only: list[str] | None = None) -> list[Subject]:
    """The trained nets in `trained_dir` if any, else the given zoo models."""
    found = sorted(trained_dir.glob("*.onnx")) if (trained_dir / "fmnist_eval.npz").exists() else []
    if found:
        sys.path.insert(0, str(TRAINED))
        import fashion_mnist  # noqa: E402 - numpy only

        x, labels = fashion_mnist.load_eval(trained_dir / "fmnist_eval.npz")
        chosen = [p for p in found if only is None or p.stem in only]
        return [Subject(p.stem, p, x, labels, outputs(p, x)) for p in chosen]
    out = []
    for name in zoo_models:
        path = ZOO / f"{name}.onnx"
        x = np.concatenate([f[next(iter(f))] for f in make_inputs(str(path), seed=0, samples=4, batch=8)])
        out.append(Subject(name, path, x, None, outputs(path, x)))
    return out


def score(subject: Subject, model: onnx.ModelProto) -> dict:
    """Relative error and top-1 agreement of `model` against the original; accuracy where labels exist."""
    got = outputs(model, subject.inputs)
    ref = subject.reference
    result = {"rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
              "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}
    if subject.labels is not None:
        result["accuracy"] = float(np.mean(got.argmax(1) == subject.labels))
        result["accuracy_original"] = float(np.mean(ref.argmax(1) == subject.labels))
    return result
