"""Backends that consume prepared models: torch.compile, ONNX export, TensorRT."""
