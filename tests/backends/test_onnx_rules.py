"""inspect_onnx: one hand-built graph (onnx.helper) per pattern TensorRT would not fuse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from qcompile.backends.onnx.rules import RULES, inspect_onnx

W = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)  # MatMul B: [K=4, N=3]


def _init(name: str, array: np.ndarray, dtype: int | None = None) -> onnx.TensorProto:
    if dtype is None:
        return numpy_helper.from_array(array, name)
    return helper.make_tensor(name, dtype, array.shape, array.flatten().tolist())


def _model(nodes, initializers, opset: int = 21, output: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(output, T.FLOAT, ["rows", "columns"])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq_matmul(*, zero_point: int = 0, act_scale=0.1, weight_axis: int = 1,
                weight_scale=(0.5, 0.25, 0.125), quantize_weight: bool = True,
                after_dq: str = "MatMul") -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., DQ(W)); each knob breaks one rule."""
    inits = [
        _init("w", W),
        _init("w_scale", np.array(weight_scale, np.float32)),
        _init("zp", np.array(zero_point, np.int8)),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=weight_axis)]
    if not quantize_weight:
        nodes, inits[0] = [], _init("w_dq", W.astype(np.float32))
    if isinstance(act_scale, str):
        nodes.append(helper.make_node("ReduceMax", ["x"], ["s"], keepdims=0))
    else:
        inits.append(_init("s", np.array(act_scale, np.float32)))
    nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x_dq"])]
    if after_dq == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]))
    else:
        nodes.append(helper.make_node(after_dq, ["x_dq", "x"], ["y"]))
    return _model(nodes, inits)


def _rules(model: onnx.ModelProto) -> list[str]:
    onnx.checker.check_model(model)
    return [finding.rule for finding in inspect_onnx(model).warnings]


def test_clean_graph_has_no_warnings_and_counts_weights():
    report = inspect_onnx(_qdq_matmul())
    assert report.warnings == []
    assert report.opset == 21
    assert report.quantize_counts[("QuantizeLinear", "INT8")] == 1
    assert report.quantize_counts[("DequantizeLinear", "INT8")] == 2
    assert report.weight_float_bytes == W.size * 4
    assert report.weight_bytes == W.size + 3 * 4
    text = report.render()
    assert "opset 21" in text and "0 warning(s)" in text and "quantized weights" in text


@pytest.mark.parametrize(("model", "rule"), [
    (lambda: _qdq_matmul(zero_point=3), "zero-point"),
    (lambda: _qdq_matmul(act_scale="computed"), "scale-not-constant"),
    (lambda: _qdq_matmul(act_scale=0.0), "scale-not-positive"),
    (lambda: _qdq_matmul(weight_scale=(0.5, -0.25, 0.125)), "scale-not-positive"),
    (lambda: _qdq_matmul(weight_axis=0, weight_scale=(1.0, 1.0, 1.0, 1.0)), "weight-axis"),
    (lambda: _qdq_matmul(quantize_weight=False), "one-sided-matmul"),
    (lambda: _qdq_matmul(after_dq="Add"), "dq-to-float-op"),
])
def test_rule_fires_on_its_pattern(model, rule):
    assert rule in _rules(model())


def test_one_sided_matmul_allows_int4_weight_only():
    inits = [_init("w", W, T.INT4), _init("w_scale", np.ones((2, 3), np.float32))]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=0, block_size=2),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
    assert _rules(_model(nodes, inits)) == []


def test_blocked_weight_along_n_is_flagged():
    inits = [_init("w", W, T.INT4), _init("w_scale", np.ones((4, 1), np.float32))]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=1, block_size=3),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
    assert _rules(_model(nodes, inits)) == ["weight-axis"]


def test_quantize_without_dequantize():
    inits = [_init("s", np.array(0.1, np.float32)), _init("zp", np.array(0, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("Cast", ["xq"], ["y"], to=T.FLOAT)]
    assert _rules(_model(nodes, inits)) == ["q-without-dq"]


def test_fp4_below_opset_23():
    inits = [_init("w", np.ones((4, 3), np.float32), T.FLOAT4E2M1),
             _init("w_scale", np.ones((2, 3), np.float32))]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=0, block_size=2),
             helper.make_node("Cast", ["x"], ["xc"], to=T.FLOAT),
             helper.make_node("MatMul", ["xc", "w_dq"], ["y"])]
    model = _model(nodes, inits, opset=21)
    assert "fp4-opset" in [f.rule for f in inspect_onnx(model).warnings]
    model.opset_import[0].version = 23
    assert "fp4-opset" not in [f.rule for f in inspect_onnx(model).warnings]


def test_every_rule_is_tested():
    tested = {"zero-point", "scale-not-constant", "scale-not-positive", "weight-axis",
              "one-sided-matmul", "q-without-dq", "dq-to-float-op", "fp4-opset"}
    assert tested == set(RULES)
