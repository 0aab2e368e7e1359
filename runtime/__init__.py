"""Loading, saving, validating and benchmarking models with onnxruntime."""
