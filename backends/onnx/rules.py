"""`qcompile inspect model.onnx`: what a Q/DQ graph holds, what TensorRT would not fuse, and
where onnxruntime's default session would compute other numbers.

This module owns the reading of an exported (or any) ONNX file: counts of quantize and
dequantize ops by element type, the opset, the bytes of quantized weights against their
float32 equivalent, one warning per pattern that TensorRT's explicit-quantization optimizer
would not fuse into a low-precision kernel (the rules in `RULES`), and one finding per pattern
that onnxruntime's default graph optimizations rewrite into something that computes other
numbers than the graph's ONNX semantics (`ORT_RULES`, measured on onnxruntime 1.32, CPU;
`backends.onnx.ort.onnxruntime_session` builds a session that avoids them). It knows nothing
of torch or of how the file was produced.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.backends.onnx.trt_ops import DEQUANTIZE_OPS, QUANTIZE_OPS, TRT_DOMAIN

RULES = {
    "zero-point": "Q/DQ with a non-zero zero point (TensorRT is symmetric only)",
    "scale-not-constant": "Q/DQ scale that is neither a constant nor TensorRT's dynamic scale",
    "scale-not-positive": "Q/DQ scale with a value <= 0 or not finite",
    "weight-axis": "weight DQ whose axis is not the output channel (or K for blocks) of its MatMul/Gemm",
    "one-sided-matmul": "quantized MatMul/Gemm with only one input dequantized",
    "q-without-dq": "QuantizeLinear not followed by DequantizeLinear",
    "dq-to-float-op": "DequantizeLinear feeding an op that stays in float",
    "fp4-opset": "FLOAT4E2M1 tensors in a model below opset 23",
}
#: onnxruntime 1.32 (CPU) default-session rewrites that change the numbers of a Q/DQ graph.
ORT_RULES = {
    "relu-dropped": (
        "Relu feeding a QuantizeLinear with an FP8 (or INT4/UINT4 not at its minimum) zero "
        "point: onnxruntime's rule ReluQuantRewrite removes the Relu although that Q does not "
        "clamp negatives (an onnxruntime bug); export at opset >= 21 (no zero point) or run it "
        "in qc.onnxruntime_session (disabled_optimizers=['ReluQuantRewrite'])"
    ),
    "propagated-q-uint8": (
        "DequantizeLinear without a zero point after a QuantizeLinear with one, feeding a "
        "Transpose: onnxruntime's QDQPropagationTransformer copies the DQ's inputs into a new Q "
        "after the Transpose, which without a zero point is UINT8 and clamps negatives to 0 (an "
        "onnxruntime bug); give the DQ the Q's zero point, or export at opset >= 21"
    ),
    "matmulnbits-int8-activations": (
        "blocked INT4/INT8 weight DequantizeLinear into a MatMul/Gemm: onnxruntime fuses it into "
        "com.microsoft::MatMulNBits with accuracy_level 4 (session config "
        "'session.qdq_matmulnbits_accuracy_level', default '4'), which quantizes the "
        "activations to int8 per block (~0.3% off); run it in qc.onnxruntime_session "
        "(accuracy level 1: float activations, same fused kernel)"
    ),
}
#: Checked against this onnxruntime version; later versions may differ.
ORT_CHECKED_VERSION = "1.32.0"
_FLOAT8_TYPES = frozenset({ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ,
                           ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ})
_CLAMPING_ZERO_POINTS = {ir.DataType.INT4: -8, ir.DataType.UINT4: 0}
_MATMULNBITS_TYPES = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8,
                                ir.DataType.UINT8})
#: Ops that move data without arithmetic; TensorRT propagates Q/DQ through them.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
_QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_WEIGHT_ONLY_TYPES = frozenset({ir.DataType.INT4, ir.DataType.INT8})
_DYNAMIC_QUANTIZE = frozenset({"TRT_FP4DynamicQuantize", "TRT_MXFP8DynamicQuantize"})


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class InspectReport:
    opsets: dict[str, int]
    quantize_counts: Counter = field(default_factory=Counter)  # (op, element type) -> count
    weight_bytes: int = 0
    weight_float_bytes: int = 0
    warnings: list[Finding] = field(default_factory=list)
    #: patterns onnxruntime's default session computes differently (`ORT_RULES`)
    onnxruntime: list[Finding] = field(default_factory=list)

    @property
    def opset(self) -> int:
        return self.opsets.get("", 0)

    def render(self) -> str:
        lines = [f"opset {self.opset}" + "".join(
            f", {d} {v}" for d, v in sorted(self.opsets.items()) if d)]
        for (op, dtype), count in sorted(self.quantize_counts.items()):
            lines.append(f"  {op:<28} {dtype:<14} {count}")
        if self.weight_float_bytes:
            ratio = self.weight_bytes / self.weight_float_bytes
            lines.append(f"quantized weights: {self.weight_bytes:,} bytes "
                         f"({ratio:.3f} of {self.weight_float_bytes:,} bytes in float32)")
        lines.append(f"{len(self.warnings)} warning(s)" + (":" if self.warnings else ""))
        lines.extend(f"  {w}" for w in self.warnings)
        if self.onnxruntime:
            lines.append(f"onnxruntime ({onnxruntime_version()}): its default session computes "
                         f"other numbers than this graph in {len(self.onnxruntime)} pattern(s):")
            lines.extend(f"  {finding}" for finding in self.onnxruntime)
        return "\n".join(lines)


def onnxruntime_version() -> str:
    """'installed X, rules checked on Y' for messages about onnxruntime."""
    try:
        installed = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    return f"installed {installed}, rules checked on {ORT_CHECKED_VERSION}"


def _producer_through_layout(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in _LAYOUT_OPS and node.domain == "":
        node = node.inputs[0].producer()
    return node


def _is_dq(node: ir.Node | None) -> bool:
    return node is not None and (node.domain, node.op_type) in DEQUANTIZE_OPS


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _is_constant(value: ir.Value) -> bool:
    """A constant, or a DequantizeLinear of constants (NVFP4's two-level scale)."""
    if _constant(value) is not None:
        return True
    node = value.producer()
    return _is_dq(node) and all(v is None or _is_constant(v) for v in node.inputs)


def _from_dynamic_quantize(value: ir.Value) -> bool:
    """The scale TensorRT computes at run time: a dynamic-quantize output, or its DQ."""
    node = value.producer()
    if node is None:
        return False
    if node.domain == TRT_DOMAIN and node.op_type in _DYNAMIC_QUANTIZE:
        return True
    return _is_dq(node) and _from_dynamic_quantize(node.inputs[0])


def _attr(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return attribute.as_int() if attribute is not None else default


def _element_type(node: ir.Node) -> str:
    if node.op_type == "QuantizeLinear":
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
            return node.inputs[2].dtype.name
        return ir.DataType(_attr(node, "output_dtype", ir.DataType.UINT8)).name
    value = node.outputs[0] if node.op_type in _DYNAMIC_QUANTIZE else node.inputs[0]
    return value.dtype.name if value.dtype is not None else "?"


def _check_qdq(node: ir.Node, findings: list[Finding]) -> None:
    zero_point = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if zero_point is not None and np.any(zero_point.astype(np.float32) != 0):
        findings.append(Finding("zero-point", node.name, "zero point is not 0"))
    scale = node.inputs[1]
    values = _constant(scale)
    if values is not None:
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values) & (values > 0)):
            findings.append(Finding("scale-not-positive", node.name, "scale has values <= 0 or not finite"))
    elif not _is_constant(scale) and not _from_dynamic_quantize(scale):
        findings.append(Finding("scale-not-constant", node.name,
                                f"scale '{scale.name}' is computed in the graph"))


def _expected_weight_axis(consumer: ir.Node, index: int, rank: int, blocked: bool) -> int | None:
    """The DQ axis TensorRT expects for a weight entering input `index` of `consumer`."""
    if index != 1:
        return None
    if consumer.op_type == "MatMul":  # B is [..., K, N]: channels on N, blocks along K
        return rank - 2 if blocked else rank - 1
    if consumer.op_type == "Gemm":  # B is [K, N], or [N, K] with transB
        trans_b = _attr(consumer, "transB", 0)
        return trans_b if blocked else 1 - trans_b
    return None


def _check_weight_axis(dq: ir.Node, findings: list[Finding]) -> None:
    data, scale = dq.inputs[0], dq.inputs[1]
    if data.const_value is None or data.shape is None or scale.shape is None:
        return
    rank = len(data.shape)
    blocked = _attr(dq, "block_size", 0) > 0
    if not blocked and scale.shape.numpy() in ((), (1,)):
        return  # per tensor
    axis = _attr(dq, "axis", 1) % rank
    for use in dq.outputs[0].uses():
        expected = _expected_weight_axis(use.node, use.idx, rank, blocked)
        if expected is not None and axis != expected:
            kind = "blocks run along" if blocked else "channel axis is"
            findings.append(Finding("weight-axis", dq.name,
                                    f"{kind} {axis}, {use.node.op_type} '{use.node.name}' needs {expected}"))


def _check_consumers(node: ir.Node, findings: list[Finding]) -> None:
    if node.op_type == "QuantizeLinear":
        uses = node.outputs[0].uses()
        if not uses or any(not _is_dq(u.node) for u in uses):
            findings.append(Finding("q-without-dq", node.name, "output is not consumed by DequantizeLinear only"))
        return
    for use in node.outputs[0].uses():
        consumer = use.node
        if _is_dq(consumer) or (consumer.op_type in _QUANTIZABLE_OPS | _LAYOUT_OPS and consumer.domain == ""):
            continue
        findings.append(Finding("dq-to-float-op", node.name,
                                f"feeds {consumer.op_type} '{consumer.name}', which stays in float"))


def _is_weight_only(dq: ir.Node) -> bool:
    """TensorRT's weight-only quantization: a constant INT4/INT8 weight, the other input float."""
    return dq.inputs[0].const_value is not None and dq.inputs[0].dtype in _WEIGHT_ONLY_TYPES


def _check_matmul(node: ir.Node, findings: list[Finding]) -> None:
    producers = [None if v is None else _producer_through_layout(v) for v in node.inputs[:2]]
    quantized = [_is_dq(p) for p in producers]
    if sum(quantized) != 1:
        return
    dq = producers[quantized.index(True)]
    if _is_weight_only(dq):
        return
    missing = node.inputs[quantized.index(False)]
    findings.append(Finding("one-sided-matmul", node.name,
                            f"input '{missing.name}' is not dequantized; it runs in float"))


def _uses_fp4(model: ir.Model) -> bool:
    fp4 = ir.DataType.FLOAT4E2M1
    if any(v.dtype == fp4 for v in model.graph.initializers.values()):
        return True
    return any(out.dtype == fp4 for node in model.graph for out in node.outputs)


def inspect_onnx(path: str | os.PathLike | onnx.ModelProto) -> InspectReport:
    """Read an ONNX model and report its quantization and TensorRT fusion warnings."""
    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(path)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    report = InspectReport(opsets=dict(model.opset_imports))
    findings = report.warnings
    for node in model.graph:
        key = (node.domain, node.op_type)
        if key in QUANTIZE_OPS or key in DEQUANTIZE_OPS:
            report.quantize_counts[(node.op_type, _element_type(node))] += 1
        if node.domain == "" and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, findings)
        if node.op_type == "QuantizeLinear" or _is_dq(node):
            _check_consumers(node, findings)
        if _is_dq(node):
            _check_weight_axis(node, findings)
            _count_weight(node, report)
        if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
            _check_matmul(node, findings)
    if report.opset < 23 and _uses_fp4(model):
        findings.append(Finding("fp4-opset", "model", f"FLOAT4E2M1 needs opset 23, model has {report.opset}"))
    report.onnxruntime = onnxruntime_findings(model)
    return report


def _drops_relu(q: ir.Node) -> bool:
    """A Relu feeds `q` only, and `q` has a constant scalar zero point that does not clamp at 0
    (ReluQuantFusion checks INT8/UINT8/INT16 zero points only, and removes the Relu)."""
    relu = q.inputs[0].producer() if q.inputs and q.inputs[0] is not None else None
    if relu is None or (relu.domain, relu.op_type) != ("", "Relu") or len(q.inputs) < 3:
        return False
    zero_point = _constant(q.inputs[2])
    dtype = q.inputs[2].dtype if q.inputs[2] is not None else None
    if zero_point is None or zero_point.size != 1 or len(relu.outputs[0].uses()) != 1:
        return False
    if dtype in _FLOAT8_TYPES:
        return True
    return dtype in _CLAMPING_ZERO_POINTS and int(zero_point.reshape(())) != _CLAMPING_ZERO_POINTS[dtype]


def _loses_zero_point(dq: ir.Node) -> bool:
    """A DQ with no zero point, fed by a Q with one, whose output a Transpose reads."""
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    if q is None or (q.domain, q.op_type) != ("", "QuantizeLinear") or len(q.inputs) < 3:
        return False
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        return False
    return any((u.node.domain, u.node.op_type) == ("", "Transpose") for u in dq.outputs[0].uses())


def _fuses_into_matmulnbits(dq: ir.Node) -> bool:
    """onnxruntime's DQ -> MatMul selector: a constant 2-d [K, N] INT4/INT8 weight in blocks
    (power of two >= 16) along K, feeding only input B of a MatMul or of a Gemm without transB
    whose input A is not dequantized (w4a8's fp8 A leaves the MatMul unfused)."""
    data = dq.inputs[0]
    block_size = _attr(dq, "block_size", 0)
    if data is None or data.const_value is None or data.dtype not in _MATMULNBITS_TYPES:
        return False
    if len(data.shape) != 2 or block_size < 16 or block_size & (block_size - 1):
        return False
    if _attr(dq, "axis", 1) % 2 != 0 or not _is_constant(dq.inputs[1]):
        return False
    uses = dq.outputs[0].uses()
    if len(uses) != 1 or uses[0].idx != 1:
        return False
    consumer = uses[0].node
    if consumer.domain != "" or consumer.op_type not in ("MatMul", "Gemm"):
        return False
    if _is_dq(consumer.inputs[0].producer()):
        return False
    return consumer.op_type == "MatMul" or _attr(consumer, "transB", 0) == 0


def onnxruntime_findings(model: ir.Model) -> list[Finding]:
    """One finding per `ORT_RULES` pattern present in `model`, naming its nodes."""
    matches: dict[str, list[str]] = {rule: [] for rule in ORT_RULES}
    for node in model.graph:
        if (node.domain, node.op_type) == ("", "QuantizeLinear") and _drops_relu(node):
            matches["relu-dropped"].append(node.name)
        if (node.domain, node.op_type) == ("", "DequantizeLinear"):
            if _loses_zero_point(node):
                matches["propagated-q-uint8"].append(node.name)
            if _fuses_into_matmulnbits(node):
                matches["matmulnbits-int8-activations"].append(node.name)
    findings = []
    for rule, nodes in matches.items():
        if nodes:
            where = nodes[0] + (f" and {len(nodes) - 1} more" if len(nodes) > 1 else "")
            findings.append(Finding(rule, where, ORT_RULES[rule]))
    return findings


def _count_weight(dq: ir.Node, report: InspectReport) -> None:
    """Add a weight DQ's stored bytes (data and constant scales) and its float32 size."""
    data = dq.inputs[0]
    uses = dq.outputs[0].uses()
    if data.const_value is None or (uses and all(_is_dq(u.node) for u in uses)):
        return  # an activation, or the block scales of a two-level (NVFP4) weight
    report.weight_float_bytes += data.const_value.size * 4
    stored = [data]
    for value in dq.inputs[1:]:
        producer = value.producer() if value is not None else None
        stored.extend(producer.inputs if _is_dq(producer) else [value])
    report.weight_bytes += sum(v.const_value.nbytes for v in stored
                               if v is not None and v.const_value is not None)
