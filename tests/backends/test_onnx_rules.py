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


# -- onnxruntime default-session rules: each hand-built graph is also run in onnxruntime, so
# the rule must fire exactly where its default session departs from the graph as written.

def _ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(default session, optimizations off) outputs of `model` on `x`."""
    ort = pytest.importorskip("onnxruntime")
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString()
    feeds = {"x": x}
    return tuple(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                 .run(None, feeds)[0] for options in (ort.SessionOptions(), off))


def _relu_quantize(zero_point_type: int | None, zero_point: int = 0, relu_uses: int = 1,
                   opset: int = 21) -> onnx.ModelProto:
    """x -> Relu -> QuantizeLinear (zero point of that type, or output_dtype) -> DequantizeLinear."""
    inits = [_init("s", np.array(0.25, np.float32))]
    q_inputs, q_attrs = ["r", "s"], {}
    if zero_point_type is None:
        q_attrs["output_dtype"] = T.FLOAT8E4M3FN
    else:
        inits.append(helper.make_tensor("zp", zero_point_type, [], [zero_point]))
        q_inputs.append("zp")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", q_inputs, ["q"], **q_attrs),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    if relu_uses == 2:
        nodes[-1].output[0] = "d"
        nodes.append(helper.make_node("Add", ["d", "r"], ["y"]))
    return _model(nodes, inits, opset=opset)


@pytest.mark.parametrize(("model", "fires"), [
    (lambda: _relu_quantize(T.FLOAT8E4M3FN, opset=19), True),
    (lambda: _relu_quantize(T.FLOAT8E4M3FN), True),
    (lambda: _relu_quantize(T.FLOAT8E5M2), True),
    (lambda: _relu_quantize(T.INT4), True),
    (lambda: _relu_quantize(T.INT4, zero_point=-8), False),  # Q clamps at 0 by itself
    (lambda: _relu_quantize(T.INT8), False),
    (lambda: _relu_quantize(T.UINT8), False),
    (lambda: _relu_quantize(None), False),  # opset 21 FP8 Q without zero point (our export)
    (lambda: _relu_quantize(T.FLOAT8E4M3FN, relu_uses=2), False),
], ids=["fp8-opset19", "fp8", "e5m2", "int4", "int4-min", "int8", "uint8", "fp8-no-zp",
        "relu-used-twice"])
def test_relu_dropped_rule_fires_where_onnxruntime_drops_the_relu(model, fires):
    model = model()
    onnx.checker.check_model(model, full_check=True)
    rules = [f.rule for f in inspect_onnx(model).onnxruntime]
    assert rules == (["relu-dropped"] if fires else [])
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    default, off = _ort_outputs(model, x)
    assert np.array_equal(default, off) != fires, (default, off)


def _blocked_matmul(dtype: int = T.INT4, block_size: int = 16, layout: str = "KN",
                    consumer: str = "MatMul", activation_dq: bool = False,
                    uses: int = 1) -> onnx.ModelProto:
    """x[2, 32] @ DQ(W, blocks along K) as onnxruntime's DQ -> MatMulNBits selector sees it."""
    k, n = 32, 8
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(k, n) if layout == "KN" else (n, k))
    scale_shape = (k // block_size, n) if layout == "KN" else (n, k // block_size)
    inits = [helper.make_tensor("w", dtype, list(w.shape), w.flatten().tolist()),
             _init("w_scale", rng.uniform(0.01, 0.02, scale_shape).astype(np.float32))]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"],
                              axis=0 if layout == "KN" else 1, block_size=block_size)]
    a = "x"
    if activation_dq:
        inits.append(_init("s", np.array(0.05, np.float32)))
        nodes += [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], output_dtype=T.FLOAT8E4M3FN),
                  helper.make_node("DequantizeLinear", ["xq", "s"], ["a"])]
        a = "a"
    if consumer == "Gemm":
        nodes.append(helper.make_node("Gemm", [a, "w_dq"], ["y"], transB=int(layout == "NK")))
    else:
        b = "w_dq"
        if layout == "NK":
            nodes.append(helper.make_node("Transpose", ["w_dq"], ["w_t"], perm=[1, 0]))
            b = "w_t"
        nodes.append(helper.make_node("MatMul", [a, b], ["y" if uses == 1 else "y1"]))
        if uses == 2:
            nodes += [helper.make_node("MatMul", [a, b], ["y2"]),
                      helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(("kwargs", "fires"), [
    ({}, True),
    ({"block_size": 32}, True),
    ({"dtype": T.UINT4}, True),
    ({"dtype": T.INT8}, True),
    ({"consumer": "Gemm"}, True),
    ({"layout": "NK"}, False),  # DQ -> Transpose -> MatMul
    ({"layout": "NK", "consumer": "Gemm"}, False),  # Gemm transB
    ({"activation_dq": True}, False),  # w4a8: fp8 activations
    ({"uses": 2}, False),
], ids=["int4", "block32", "uint4", "int8", "gemm", "transposed", "gemm-transb", "w4a8",
        "shared"])
def test_matmulnbits_rule_fires_where_onnxruntime_quantizes_activations(kwargs, fires):
    model = _blocked_matmul(**kwargs)
    onnx.checker.check_model(model, full_check=True)
    rules = [f.rule for f in inspect_onnx(model).onnxruntime]
    assert rules == (["matmulnbits-int8-activations"] if fires else [])
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    default, off = _ort_outputs(model, x)
    differs = np.abs(default - off).max() / np.abs(off).max() > 1e-5
    assert differs == fires


def test_onnxruntime_findings_are_rendered_with_the_version():
    report = inspect_onnx(_blocked_matmul())
    assert report.warnings == []  # not a TensorRT fusion problem
    text = report.render()
    assert "onnxruntime (installed " in text and "[matmulnbits-int8-activations]" in text
    assert "session.qdq_matmulnbits_accuracy_level" in text


def _quantize_transpose(dtype: int, opset: int, q_zero_point: bool, dq_zero_point: bool,
                        consumer: str = "Transpose") -> onnx.ModelProto:
    """x -> Q -> DQ -> (Transpose) -> MatMul(DQ, .): the attention product's pattern."""
    inits = [_init("s", np.array(0.05, np.float32)), helper.make_tensor("zp", dtype, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"] + ["zp"] * q_zero_point, ["q"],
                              **({} if q_zero_point else {"output_dtype": dtype})),
             helper.make_node("DequantizeLinear", ["q", "s"] + ["zp"] * dq_zero_point, ["d"])]
    if consumer == "Transpose":
        nodes += [helper.make_node("Transpose", ["d"], ["t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["d", "t"], ["y"])]
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["y"]))
    return _model(nodes, inits if q_zero_point or dq_zero_point else inits[:1], opset=opset)


@pytest.mark.parametrize(("model", "fires"), [
    (lambda: _quantize_transpose(T.INT8, 19, True, False), True),
    (lambda: _quantize_transpose(T.FLOAT8E4M3FN, 19, True, False), True),
    (lambda: _quantize_transpose(T.INT8, 19, True, True), False),  # qcompile's export < 21
    (lambda: _quantize_transpose(T.INT8, 21, False, False), False),  # qcompile's export >= 21
    (lambda: _quantize_transpose(T.INT8, 19, True, False, consumer="Mul"), False),
], ids=["int8", "fp8", "int8-dq-zero-point", "opset21", "no-transpose"])
def test_propagated_q_rule_fires_where_onnxruntime_loses_the_zero_point(model, fires):
    model = model()
    onnx.checker.check_model(model, full_check=True)
    rules = [f.rule for f in inspect_onnx(model).onnxruntime]
    assert rules == (["propagated-q-uint8"] if fires else [])
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    default, off = _ort_outputs(model, x)
    assert (np.abs(default - off).max() > 1e-6) == fires, (default, off)
