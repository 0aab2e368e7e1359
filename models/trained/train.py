"""Train the four Fashion-MNIST nets of ``nets.py`` on CPU, export them to ONNX and record their accuracy.

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms``, 2 threads.  Writes, next to this file:

* ``<name>.onnx``: TorchScript exporter, opset 17, input ``input`` [N, 1, 28, 28], output ``logits`` [N, 10]
* ``fmnist_eval.npz``: a fixed 2,000-image subset of the test set (uint8 images, labels)
* ``accuracy.json``: per model, onnxruntime accuracy on the full 10k test set and on that subset

torch is a development dependency: it is imported only here and in ``nets.py``.  The data come from Debian's
``dataset-fashion-mnist`` (see ``fashion_mnist.py``).

Usage::

    python models/trained/train.py [--models resnet20,se_net] [--epochs 4] [--out models/trained]
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
import zlib
from pathlib import Path

# Before torch loads OpenMP: threads that spin while waiting make training ~20x slower on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fashion_mnist  # noqa: E402
from nets import NETS  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 4
BATCH = 128
MAX_LR, WEIGHT_DECAY = 3e-3, 5e-4
MAX_SHIFT = 2  # random translation of training images, in pixels
EVAL_SUBSET = 2000
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
THREADS = 2


def set_deterministic(seed: int) -> None:
    """Seed torch and make every op deterministic, on ``THREADS`` CPU threads."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``MAX_SHIFT`` pixels (zero padded), per batch."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    dy, dx = (torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2,), generator=gen)).tolist()
    background = -fashion_mnist.MEAN / fashion_mnist.STD  # a black pixel, standardised
    padded = nn.functional.pad(x, (MAX_SHIFT,) * 4, value=background)
    return padded[:, :, MAX_SHIFT + dy: MAX_SHIFT + dy + 28, MAX_SHIFT + dx: MAX_SHIFT + dx + 28]


def train(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple[nn.Module, dict]:
    """Train net ``name`` with AdamW and a one-cycle schedule.

    Returns the model (in eval mode) and the wall-clock and CPU seconds taken (on a machine that other
    jobs share, CPU seconds / ``THREADS`` is roughly the wall time it would take alone).
    """
    seed = SEED + zlib.crc32(name.encode())
    set_deterministic(seed)
    model = NETS[name]()
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), BATCH):
            idx = order[i: i + BATCH]
            loss = nn.functional.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  {name} epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = {"wall": round(time.perf_counter() - start), "cpu": round(time.process_time() - cpu_start)}
    return model.eval(), seconds


def export(model: nn.Module, path: Path) -> None:
    """Export with the TorchScript exporter, opset 17, dynamic batch."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)


def onnx_predictions(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Class predictions of an ONNX model under onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = [sess.run(None, {INPUT_NAME: x[i: i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(logits).argmax(1)


def torch_predictions(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Class predictions of the torch model, to cross-check the export."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def eval_subset(images: np.ndarray, labels: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``EVAL_SUBSET`` test images with a fixed seed, save them (uint8) and return the model inputs."""
    idx = np.sort(np.random.default_rng(SEED).choice(len(images), EVAL_SUBSET, replace=False))
    np.savez_compressed(path, images=images[idx], labels=labels[idx].astype(np.uint8), test_indices=idx)
    return fashion_mnist.load_eval(path)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Correct count, total and accuracy."""
    correct = int((pred == labels).sum())
    return {"correct": correct, "total": int(len(labels)), "accuracy": round(correct / len(labels), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(NETS), help="comma-separated subset of " + ",".join(NETS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = sorted(set(names) - set(NETS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)

    train_images, train_labels = fashion_mnist.load_split("train")
    test_images, test_labels = fashion_mnist.load_split("test")
    x_train = torch.from_numpy(fashion_mnist.normalize(train_images))
    y_train = torch.from_numpy(train_labels)
    x_test = fashion_mnist.normalize(test_images)
    x_sub, y_sub = eval_subset(test_images, test_labels, args.out / "fmnist_eval.npz")

    record_path = args.out / "accuracy.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for name in names:
        print(f"training {name} ({args.epochs} epochs, batch {BATCH}, {THREADS} threads)", flush=True)
        model, seconds = train(name, x_train, y_train, args.epochs)
        path = args.out / f"{name}.onnx"
        export(model, path)
        full = onnx_predictions(path, x_test)
        agree = float((full == torch_predictions(model, x_test)).mean())
        record[name] = {
            "test_10k": accuracy(full, test_labels),
            "eval_subset": accuracy(onnx_predictions(path, x_sub), y_sub),
            "params": sum(p.numel() for p in model.parameters()),
            "epochs": args.epochs,
            "train_seconds": seconds,
            "onnx_torch_agreement": agree,
        }
        print(f"  {name}: test {record[name]['test_10k']['accuracy']:.4f}, subset "
              f"{record[name]['eval_subset']['accuracy']:.4f}, {path.stat().st_size / 1e6:.2f} MB, "
              f"trained in {seconds['wall']} s ({seconds['cpu']} CPU s), onnx/torch agreement {agree:.4f}", flush=True)
        record_path.write_text(json.dumps(dict(sorted(record.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
