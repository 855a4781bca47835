"""ONNX export: Q/DQ graphs for TensorRT (`export`), their inspection (`rules`), the
standard-ONNX reference evaluator (`reference`), an onnxruntime session that computes the
exported numbers (`ort`) and the per-quantizer parity check (`verify`); see each module."""

from qcompile.backends.onnx.export import OnnxExportError, OnnxRuntimeWarning, export_onnx
from qcompile.backends.onnx.ort import onnxruntime_session
from qcompile.backends.onnx.rules import InspectReport, inspect_onnx
from qcompile.backends.onnx.verify import ParityReport, verify_onnx

__all__ = ["InspectReport", "OnnxExportError", "OnnxRuntimeWarning", "ParityReport",
           "export_onnx", "inspect_onnx", "onnxruntime_session", "verify_onnx"]
