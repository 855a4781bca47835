"""ONNX export: Q/DQ graphs for TensorRT (`export`), their inspection (`rules`), and the
standard-ONNX reference evaluator (`reference`); see each module for what it owns."""

from qcompile.backends.onnx.export import OnnxExportError, export_onnx
from qcompile.backends.onnx.rules import InspectReport, inspect_onnx

__all__ = ["OnnxExportError", "InspectReport", "export_onnx", "inspect_onnx"]
