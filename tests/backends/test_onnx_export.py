"""export_onnx: numerics against independent evaluators, weight storage, graph structure.

References: the eval-mode torch model (qcompile's own numerics) on one side; on the other,
onnxruntime for int8/fp8/int4, both with graph optimizations off (the Q/DQ graph as written)
and in the session a user gets: its default one, or, where `inspect_onnx` finds a pattern the
default session computes differently (int4 weights: MatMulNBits with int8 activations),
`onnxruntime_session`; and `onnx.reference.ReferenceEvaluator` for the fp4/mx formats and
every `target="onnx"` graph. test_onnx_runtimes covers onnxruntime's sessions in depth.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from qcompile.backends.onnx.export import OnnxExportError, export_onnx
from qcompile.backends.onnx.ort import onnxruntime_session
from qcompile.backends.onnx.rules import inspect_onnx
from qcompile.core.quantizer import Quantizer, QuantSpec

T = onnx.TensorProto
#: format -> (weight spec, activation spec or None, quantize the activation-activation matmul)
SPECS = {
    "int8": (QuantSpec("int8", axis=0, dynamic=True), QuantSpec("int8"), True),
    "fp8": (QuantSpec("fp8"), QuantSpec("fp8"), True),
    "int4": (QuantSpec("int4", dynamic=True), None, False),
    "nvfp4": (QuantSpec("nvfp4"), QuantSpec("nvfp4"), False),
    "mxfp4": (QuantSpec("mxfp4"), QuantSpec("mxfp4"), False),
    "mxfp8": (QuantSpec("mxfp8"), QuantSpec("mxfp8"), False),
}
#: format -> (opset chosen, weight initializer types, file-size limit against float)
EXPECTED = {
    "int8": (18, {T.INT8}, 0.30),
    "fp8": (21, {T.FLOAT8E4M3FN}, 0.30),  # 19 would do; 21 avoids the Q zero point
    "int4": (21, {T.INT4}, 0.20),
    "nvfp4": (23, {T.FLOAT4E2M1, T.FLOAT8E4M3FN}, 0.20),
    "mxfp4": (23, {T.FLOAT4E2M1}, 0.20),
    "mxfp8": (21, {T.FLOAT8E4M3FN}, 0.30),
}
TOLERANCE = 1e-3


def _quantizer(spec: QuantSpec | None) -> nn.Module:
    return Quantizer(spec) if spec is not None else nn.Identity()


class TwoLinear(nn.Module):
    """Two quantized Linears and, optionally, a matmul of two quantized activations."""

    def __init__(self, weight: QuantSpec | None, activation: QuantSpec | None, matmul: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(512, 512), nn.Linear(512, 512)
        self.fc1_w, self.fc2_w = _quantizer(weight), _quantizer(weight)
        self.fc1_x, self.fc2_x = _quantizer(activation), _quantizer(activation)
        self.mm_a = _quantizer(activation) if matmul else None
        self.mm_b = _quantizer(activation) if matmul else None

    def forward(self, x: torch.Tensor):
        h = torch.relu(nn.functional.linear(self.fc1_x(x), self.fc1_w(self.fc1.weight), self.fc1.bias))
        y = nn.functional.linear(self.fc2_x(h), self.fc2_w(self.fc2.weight), self.fc2.bias)
        if self.mm_a is None:
            return y
        return y, self.mm_a(y) @ self.mm_b(y).transpose(-1, -2)


def _data(batch: int, seed: int) -> torch.Tensor:
    """Normal data with outliers (20x on every 37th feature, 60x on one element)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 512, generator=generator)
    x[..., ::37] *= 20
    x[0, 0, 5] = 60.0
    return x


def _calibrate_max(model: nn.Module, x: torch.Tensor) -> None:
    """Static amax = max |input| seen, for every quantizer with a static spec (per tensor)."""
    static = {q: None for q in model.modules() if isinstance(q, Quantizer) and not q.spec.dynamic}
    for q in static:
        q.enabled = False
    hooks = [q.register_forward_pre_hook(lambda q, a: static.__setitem__(q, a[0].abs().amax()))
             for q in static]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for q, amax in static.items():
        q.enabled = True
        q.set_amax(amax)


def build(fmt: str) -> TwoLinear:
    torch.manual_seed(0)
    model = TwoLinear(*SPECS[fmt]).eval()
    _calibrate_max(model, _data(4, seed=1))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(format, target, opset) -> (model, path), each exported once per module."""
    cache: dict[tuple[str, str, int | None], tuple[TwoLinear, str]] = {}

    def get(fmt: str, target: str, opset: int | None = None):
        if (fmt, target, opset) not in cache:
            model = build(fmt)
            path = tmp_path_factory.mktemp(f"{fmt}_{target}") / "model.onnx"
            export_onnx(model, (_data(4, seed=1),), path, target=target, opset=opset)
            cache[fmt, target, opset] = model, str(path)
        return cache[fmt, target, opset]

    return get


@pytest.fixture(scope="module")
def float_size(tmp_path_factory) -> int:
    model = build("int8")
    for q in model.modules():
        if isinstance(q, Quantizer):
            q.enabled = False
    path = tmp_path_factory.mktemp("float") / "model.onnx"
    export_onnx(model, (_data(4, seed=1),), path, target="onnx")
    return path.stat().st_size


def _max_relative_difference(model: nn.Module, outputs: list[np.ndarray], x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(outputs) == len(expected)
    return max(float(np.abs(o - e.numpy()).max() / np.abs(e.numpy()).max())
               for o, e in zip(outputs, expected))


def _ort_sessions(path: str) -> list[ort.InferenceSession]:
    """onnxruntime with optimizations off, and the default session (`onnxruntime_session`
    where the default departs from the graph, as inspect says)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    user = onnxruntime_session if inspect_onnx(path).onnxruntime else ort.InferenceSession
    return [ort.InferenceSession(path, options), user(path)]


def _ort_difference(model: nn.Module, path: str, x: torch.Tensor) -> float:
    """The larger max relative difference of the two `_ort_sessions` from the torch model."""
    return max(_max_relative_difference(
        model, session.run(None, {session.get_inputs()[0].name: x.numpy()}), x)
        for session in _ort_sessions(path))


def _run_reference(path: str, x: torch.Tensor) -> list[np.ndarray]:
    return ReferenceEvaluator(onnx.load(path)).run(None, {"x": x.numpy()})


def _weight_types(model: onnx.ModelProto) -> set[int]:
    """Types of the initializers that feed a dequantize op as data or as a block scale."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {inits[n.input[0]] for n in model.graph.node
            if n.op_type.endswith("DequantizeLinear") and n.input[0] in inits}


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_tensorrt_target_matches_torch_in_onnxruntime(exported, fmt):
    model, path = exported(fmt, "tensorrt")
    x = _data(3, seed=2)  # exported with batch 4: the batch axis is dynamic
    assert _ort_difference(model, path, x) < TOLERANCE


@pytest.mark.parametrize(("fmt", "opset"), [("nvfp4", None), ("mxfp4", None), ("mxfp8", None),
                                           ("int8", 19)])  # onnx.reference has no opset-18 DQ
def test_onnx_target_matches_torch_in_reference_evaluator(exported, fmt, opset):
    model, path = exported(fmt, "onnx", opset)
    if opset is not None:
        assert onnx.load(path).opset_import[0].version == opset
    x = _data(3, seed=2)
    assert _max_relative_difference(model, _run_reference(path, x), x) < TOLERANCE


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nvfp4", "mxfp8"])
def test_tensorrt_target_checks_stores_weights_low_precision_and_shrinks(exported, float_size, fmt):
    _, path = exported(fmt, "tensorrt")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    opset, weight_types, size_limit = EXPECTED[fmt]
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert _weight_types(model) >= weight_types
    assert not [i.name for i in model.graph.initializer if i.name.endswith(".weight")]
    assert os.path.getsize(path) / float_size <= size_limit


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8"])
def test_onnx_target_checks_and_shrinks(exported, float_size, fmt):
    _, path = exported(fmt, "onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    opset, weight_types, size_limit = EXPECTED[fmt]
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert _weight_types(model) >= weight_types
    assert {o.domain for o in model.opset_import} == {""}
    # Standard ONNX below opset 24 has no E8M0 scale type: MX block scales stay fp32 here
    # (4 bytes per 32 elements); the TensorRT form stores them as uint8 E8M0.
    e8m0_as_fp32 = 4 / 32 / 4 if fmt.startswith("mx") else 0.0
    assert os.path.getsize(path) / float_size <= size_limit + e8m0_as_fp32


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _dequantized(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in ("Transpose", "Reshape"):
        node = producers.get(node.input[0])
    return node is not None and node.op_type.endswith("DequantizeLinear")


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nvfp4", "mxfp8"])
def test_tensorrt_graph_feeds_every_matmul_from_dequantize(exported, fmt):
    _, path = exported(fmt, "tensorrt")
    model = onnx.load(path)
    producers = _producers(model)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == (3 if SPECS[fmt][2] else 2)
    weight_only = SPECS[fmt][1] is None
    for node in matmuls:
        flags = [_dequantized(name, producers) for name in node.input[:2]]
        assert flags == ([False, True] if weight_only else [True, True]), node.name
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = onnx.numpy_helper.to_array(
                next(i for i in model.graph.initializer if i.name == node.input[2]))
            assert not np.any(zero.astype(np.float32))
    assert inspect_onnx(path).warnings == []


def test_nvfp4_tensorrt_uses_fp4_dynamic_quantize(exported):
    _, path = exported("nvfp4", "tensorrt")
    model = onnx.load(path)
    producers = _producers(model)
    quantize = [n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert len(quantize) == 2
    for node in quantize:
        assert node.domain == "trt"
        assert _attributes(node) == {"axis": -1, "block_size": 16, "scale_type": T.FLOAT8E4M3FN}
        data, block_scale = node.output
        scale_dq = next(n for n in model.graph.node if n.input[:1] == [block_scale])
        assert scale_dq.op_type == "DequantizeLinear" and scale_dq.input[1] == node.input[1]
        data_dq = next(n for n in model.graph.node if n.input[:1] == [data])
        assert data_dq.input[1] == scale_dq.output[0]
        assert _attributes(data_dq)["block_size"] == 16
        assert producers.get(node.input[1]) is None  # the global scale is an initializer


def test_mxfp8_tensorrt_uses_mxfp8_ops(exported):
    _, path = exported("mxfp8", "tensorrt")
    model = onnx.load(path)
    quantize = [n for n in model.graph.node if n.op_type == "TRT_MXFP8DynamicQuantize"]
    dequantize = [n for n in model.graph.node if n.op_type == "TRT_MXFP8DequantizeLinear"]
    assert len(quantize) == 2 and len(dequantize) == 4
    for node in quantize:
        assert _attributes(node) == {"axis": -1, "block_size": 32, "output_dtype": T.FLOAT8E4M3FN}
    for node in dequantize:
        assert node.domain == "trt"
        assert _attributes(node) == {"axis": -1, "block_size": 32, "output_dtype": T.FLOAT}
    assert _weight_types(model) == {T.FLOAT8E4M3FN}
    scale_types = {i.data_type for i in model.graph.initializer
                   if any(n.input[1] == i.name for n in dequantize)}
    assert scale_types == {T.UINT8}


def test_rank2_input_exports_gemm_with_weight_axis_on_output_channels(tmp_path):
    model = build("int8")
    model.mm_a = model.mm_b = None
    x = _data(4, seed=1)[:, 0]
    path = export_onnx(model, (x,), tmp_path / "gemm.onnx")
    assert {n.op_type for n in onnx.load(path).graph.node} >= {"Gemm"}
    assert inspect_onnx(path).warnings == []
    x2 = _data(3, seed=2)[:, 0]
    assert _ort_difference(model, str(path), x2) < TOLERANCE


def test_opset_too_low_is_refused():
    with pytest.raises(ValueError, match=r"opset=18 is too low.*fp8.*opset 19"):
        export_onnx(build("fp8"), (_data(4, seed=1),), "unused.onnx", opset=18)


@pytest.mark.parametrize(("fmt", "match"), [
    ("mxfp4", "TensorRT has no MXFP4"),
    ("mxfp8_ocp", "computes its block scales by the ceil rule"),
    ("int4-activations", "INT4 weights only"),
    ("int8-dynamic", "needs static scales"),
])
def test_tensorrt_refuses_what_it_cannot_run(fmt, match):
    specs = {
        "mxfp4": SPECS["mxfp4"],
        "mxfp8_ocp": (QuantSpec("mxfp8_ocp"), QuantSpec("mxfp8_ocp"), False),
        "int4-activations": (None, QuantSpec("int4", dynamic=True), False),
        "int8-dynamic": (None, QuantSpec("int8", dynamic=True), False),
    }[fmt]
    with pytest.raises(ValueError, match=match):
        export_onnx(TwoLinear(*specs).eval(), (_data(4, seed=1),), "unused.onnx")


@torch.library.custom_op("qcompile_test::untranslatable", mutates_args=())
def _untranslatable(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_untranslatable.register_fake
def _(x):
    return torch.empty_like(x)


def test_export_error_names_node_and_op(tmp_path):
    class Model(nn.Module):
        def forward(self, x):
            return torch.ops.qcompile_test.untranslatable(x) + 1

    with pytest.raises(OnnxExportError, match=r"node 'untranslatable' \(op .*qcompile_test.untranslatable") as info:
        export_onnx(Model(), (torch.randn(2, 4),), tmp_path / "bad.onnx")
    assert "Traceback" not in str(info.value)



def test_exported_graph_module_with_call_module_quantizers(tmp_path):
    """The shape of a prepared model: torch.export'ed `.module()` with quantizer call_modules."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    x = torch.randn(4, 8, 64)
    batch = {0: torch.export.Dim("batch")}
    graph_module = torch.export.export(model, (x,), dynamic_shapes=(batch,), strict=False).module()
    linears = [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    for i, node in enumerate(linears):
        activation, weight = Quantizer(QuantSpec("fp8")), Quantizer(QuantSpec("fp8", axis=0, dynamic=True))
        activation.set_amax(torch.tensor(3.0))
        for role, quantizer, arg in (("input", activation, node.args[0]), ("weight", weight, node.args[1])):
            graph_module.add_submodule(f"q{i}_{role}", quantizer)
            with graph_module.graph.inserting_before(node):
                call = graph_module.graph.call_module(f"q{i}_{role}", (arg,))
            node.replace_input_with(arg, call)
    graph_module.recompile()
    path = export_onnx(graph_module, (x,), tmp_path / "graph_module.onnx")
    assert _weight_types(onnx.load(path)) == {T.FLOAT8E4M3FN}
    assert inspect_onnx(path).warnings == []
    x2 = torch.randn(3, 8, 64)
    assert _ort_difference(graph_module, str(path), x2) < TOLERANCE
