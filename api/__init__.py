"""onnx-prune: structured channel pruning of ONNX CNNs.

    import onnx_prune
    model, report = onnx_prune.prune("in.onnx", ratio=0.3)
    onnx_prune.save(model, "out.onnx")
"""
from onnx_prune.errors import PruneError

__version__ = "0.1.0"
# public name -> module; loaded on first use, so that `import onnx_prune` (and the command's entry point,
# `onnx_prune.entry`) starts without importing onnx, onnxruntime and scipy
_LAZY = {"prune": "pipeline", "analyze": "pipeline", "prepare": "pipeline", "PruneReport": "pipeline",
         "AnalysisReport": "pipeline", "PruneOptions": "options", "red": "red", "load": "runtime.io",
         "save": "runtime.io", "validate": "runtime.fidelity"}
__all__ = ["prune", "red", "analyze", "prepare", "load", "save", "validate", "PruneError", "PruneReport",
           "PruneOptions", "AnalysisReport"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'onnx_prune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"onnx_prune.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
