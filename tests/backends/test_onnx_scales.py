"""Exported scales equal qcompile's, bit for bit: the standard-ONNX form of the dynamic MX
quantizers (both E8M0 rules) and the MX weight scales written to the file, fp32 and E8M0.

References: `onnx.reference.ReferenceEvaluator` and onnxruntime (graph optimizations off) run
the exported graph; the ml_dtypes reference (tests/references.py) and qcompile's eager numerics
give the expected numbers. Data: one block per E8M0 edge amax (exactly max * 2**k, one ulp
either side, powers of two, zero, fp32 subnormals, the largest floats).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from references import REF_FORMATS, e8m0_edge_blocks, ml_dtypes_fake_quantize, reference_scales
from torch import nn

from qcompile.backends.onnx.export import export_onnx
from qcompile.core.formats import get_format
from qcompile.core.quantizer import Quantizer, QuantSpec

MX = ["mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp"]


def edge_blocks(name: str) -> torch.Tensor:
    return torch.from_numpy(e8m0_edge_blocks(get_format(name).element.max_value))


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    differ = actual.view(np.int32) != expected.view(np.int32)
    assert not differ.any(), f"{int(differ.sum())} differ, first at {np.argwhere(differ)[:3].tolist()}"


class Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.quantizer = Quantizer(QuantSpec(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)


@pytest.mark.parametrize("name", MX)
def test_standard_onnx_dynamic_quantizer_is_bit_exact(name, tmp_path):
    x = edge_blocks(name)
    model = Activation(name).eval()
    path = export_onnx(model, (x,), tmp_path / "q.onnx", target="onnx")
    expected = ml_dtypes_fake_quantize(x.numpy(), name)
    with torch.no_grad():
        assert_same_bits(model(x).numpy(), expected)
    graph = onnx.load(path)
    assert_same_bits(ReferenceEvaluator(graph).run(None, {"x": x.numpy()})[0], expected)
    if name.startswith("mxfp8"):  # onnxruntime has no FLOAT4E2M1 QuantizeLinear kernel
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options)
        assert_same_bits(session.run(None, {"x": x.numpy()})[0], expected)


class Weight(nn.Module):
    def __init__(self, name: str, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.quantizer = Quantizer(QuantSpec(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.quantizer(self.weight).t()


def _initializer(graph: onnx.ModelProto, data_type: int) -> np.ndarray:
    found = [i for i in graph.graph.initializer if i.data_type == data_type]
    assert len(found) == 1, [i.name for i in graph.graph.initializer]
    return onnx.numpy_helper.to_array(found[0])


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_exported_weight_scales_are_the_reference_scales(name, target, tmp_path):
    if target == "tensorrt" and name.startswith("mxfp4"):
        pytest.skip("TensorRT has no MXFP4 ops (refused at export)")
    weight = edge_blocks(name)
    model = Weight(name, weight).eval()
    path = export_onnx(model, (torch.ones(2, 32),), tmp_path / "w.onnx", target=target)
    graph = onnx.load(path)
    expected = reference_scales(weight.numpy(), REF_FORMATS[name]).scale.ravel()  # per row
    reference = ml_dtypes_fake_quantize(weight.numpy(), name)
    if target == "onnx":
        assert_same_bits(_initializer(graph, onnx.TensorProto.FLOAT).ravel(), expected)
        # Through the model's matmul with the identity, leaving out the rows the ceil rule
        # dequantizes to inf (amax within 2**-2 of FLT_MAX: 0 * inf is NaN in the product);
        # exact values, but a sum makes -0 into +0.
        eye = np.eye(32, dtype=np.float32)
        finite = np.isfinite(reference).all(axis=1)
        assert finite.sum() >= len(finite) - 2
        product = ReferenceEvaluator(graph).run(None, {"x": eye})[0]
        np.testing.assert_array_equal(product[:, finite], reference[finite].T)
        return
    stored = _initializer(graph, onnx.TensorProto.UINT8).astype(np.int64).ravel()
    np.testing.assert_array_equal(stored, np.frexp(expected.astype(np.float64))[1] - 1 + 127)
    data = _initializer(graph, onnx.TensorProto.FLOAT8E4M3FN).astype(np.float32)
    data = data if data.shape == weight.shape else data.T
    decoded = np.ldexp(np.float64(1), stored - 127).astype(np.float32)  # 2**-127 exact
    assert_same_bits((data * decoded[:, None]).astype(np.float32), reference)
