"""onnx-prune: structured channel pruning of ONNX CNNs.

    import onnx_prune
    model, report = onnx_prune.prune("in.onnx", ratio=0.3)
    onnx_prune.save(model, "out.onnx")
"""
from onnx_prune.errors import PruneError
from onnx_prune.pipeline import AnalysisReport, PruneOptions, PruneReport, analyze, prepare, prune
from onnx_prune.red import red
from onnx_prune.runtime.io import load, save
from onnx_prune.runtime.fidelity import validate

__version__ = "0.1.0"
__all__ = ["prune", "red", "analyze", "prepare", "load", "save", "validate", "PruneError", "PruneReport",
           "PruneOptions", "AnalysisReport"]
