"""Attention in ONNX (#27): the qkv export is TensorRT's fused-attention Q/DQ pattern and
computes the model's numbers (onnx.reference, onnxruntime); `quantize_softmax=True` adds the
fixed-scale Q/DQ on P, checked against ml_dtypes."""

from __future__ import annotations

import math
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from fake_tensorrt import FakeTensorRT
from onnx.reference import ReferenceEvaluator
from references import ml_dtypes_fake_quantize
from torch import nn

import qcompile as qc
from qcompile.backends.onnx.ort import onnxruntime_session
from qcompile.backends.onnx.rules import inspect_onnx
from qcompile.backends.tensorrt import engine as trt_backend
from qcompile.cli import main

HEADS, WIDTH = 2, 32


class Attention(nn.Module):
    """Projection, heads, fused SDPA (causal or with a padding mask); no output projection,
    so the graph's output is the attention's."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.causal = causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2)
                   for t in self.qkv(x).split(WIDTH, dim=-1))
        if self.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, WIDTH, generator=generator)
    x[0, 3, 5] = 9.0  # an outlier
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    return x, mask


def _export(fmt: str, causal: bool, path, **options):
    torch.manual_seed(0)
    prepared = qc.prepare(Attention(causal).eval(), fmt, example_inputs=_inputs())
    qc.calibrate(prepared, [_inputs(seed) for seed in range(3)], progress=False)
    # opset 21: onnx.reference has no DequantizeLinear-18 (int8's default opset)
    qc.export_onnx(prepared.eval(), _inputs(), path, opset=21, **options)
    return prepared, onnx.load(path)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _feeds(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


SLOW = pytest.mark.slow  # an export each (~5-20 s); one case of each test stays in the fast suite


@pytest.mark.parametrize("fmt, causal", [
    ("fp8", False), pytest.param("int8", True, marks=SLOW), pytest.param("int8", False, marks=SLOW),
    pytest.param("fp8", True, marks=SLOW),
])
def test_qkv_export_is_tensorrt_attention_pattern_with_the_models_numbers(fmt, causal, tmp_path):
    prepared, model = _export(fmt, causal, tmp_path / "a.onnx")
    producers, uses = _producers(model), _feeds(model)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1
    first = producers[softmax[0].input[0]]
    while first.op_type != "MatMul":  # the mask's Add / Where
        first = producers[first.input[0]]
    second = uses[softmax[0].output[0]][0]
    while second.op_type != "MatMul":  # torch's NaN guard for fully masked rows (Where)
        second = uses[second.output[0]][-1]
    # Both operands of q @ k^T and V read DequantizeLinear directly (K's layout ops moved
    # above its Q/DQ); the query's Q reads q * head_dim**-0.5.
    assert [producers[i].op_type for i in first.input] == ["DequantizeLinear"] * 2
    assert producers[second.input[1]].op_type == "DequantizeLinear"
    query_q = producers[producers[first.input[0]].input[0]]
    mul = producers[query_q.input[0]]
    assert mul.op_type == "Mul"
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in model.graph.node if n.op_type == "Constant"})
    scale = [constants[i] for i in mul.input if i in constants]
    assert scale and math.isclose(float(scale[0]), (WIDTH // HEADS) ** -0.5, rel_tol=1e-6)
    assert not any(producers.get(n.input[0], n).op_type == "DequantizeLinear"
                   for n in model.graph.node if n.op_type == "Shape")
    # TensorRT fuses all but P @ V, whose P stays float (as in the model).
    assert [f.rule for f in inspect_onnx(model).warnings] == ["one-sided-matmul"]

    x, mask = _inputs(seed=5)
    with torch.no_grad():
        expected = prepared(x, mask).numpy()
    feeds = {"x": x.numpy(), "mask": mask.numpy()}
    feeds = {i.name: feeds[i.name] for i in model.graph.input}
    got = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    got = onnxruntime_session(str(tmp_path / "a.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("fmt, causal", [("int8", True), pytest.param("fp8", False, marks=SLOW)])
def test_quantize_softmax_rounds_p_with_amax_one(fmt, causal, tmp_path, monkeypatch, capsys):
    prepared, model = _export(fmt, causal, tmp_path / "a.onnx", quantize_softmax=True)
    assert inspect_onnx(model).warnings == []
    # `qcompile build --strict` (no fusion warning) builds it, strongly typed, with the fake
    # TensorRT module of tests/backends.
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "_device_capability", lambda: None)
    shapes = [f"x:1x8x{WIDTH},2x8x{WIDTH},4x8x{WIDTH}", "mask:1x8,2x8,4x8"]
    shapes = [shape for shape in shapes if shape.split(":")[0] in
              {i.name for i in model.graph.input}]
    assert main(["build", str(tmp_path / "a.onnx"), "--strict", "--no-progress",
                 *[arg for shape in shapes for arg in ("--shape", shape)]]) == 0, capsys.readouterr()
    assert fake.called("Builder")
    producers = _producers(model)
    (dq,) = [n for n in model.graph.node if n.name.endswith("_p_dequantize")]
    probs = producers[dq.input[0]].input[0]  # P, or P after the NaN guard
    # Read P and its Q/DQ from the graph, and check them against ml_dtypes (amax 1).
    model.graph.output.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                               for name in (probs, dq.output[0])])
    x, mask = _inputs(seed=5)
    feeds = {"x": x.numpy(), "mask": mask.numpy()}
    feeds = {i.name: feeds[i.name] for i in model.graph.input}
    out, probs, rounded = ReferenceEvaluator(model).run(None, feeds)
    np.testing.assert_array_equal(rounded, ml_dtypes_fake_quantize(probs, fmt, amax=1.0))
    assert (rounded != probs).any()
    # The rest is the model's attention: close to it, but P's rounding shows.
    with torch.no_grad():
        expected = prepared(x, mask).numpy()
    difference = np.abs(out - expected).max() / np.abs(expected).max()
    assert 1e-6 < difference < 0.1
