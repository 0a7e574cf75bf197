"""Engines: the decoder step as an explicit-tensor graph, its ONNX export and runtimes."""
