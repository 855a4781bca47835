"""ONNX translations of the qcompile ops, written with onnxscript.

This module owns how one quantization becomes ONNX nodes, per target:

- `qcompile::fake_quantize` (activations): `QuantizeLinear -> DequantizeLinear`. A static
  amax becomes the scale `max(amax / element_max, FLT_MIN)` (folded to a constant initializer
  by the optimizer; the floor keeps a zero amax from giving a zero scale, so such a tensor
  dequantizes to at most 127 * 1.2e-38 instead of exactly 0). Dynamic scales are computed
  with standard ops in `target="onnx"`, mirroring `qcompile.core.numerics` step by step, and with
  TensorRT's dynamic-quantize ops in `target="tensorrt"` (see `backends.onnx.trt_ops`).
- `qcompile_onnx::dequantize_weight` (weights, see `backends.onnx.weights`): a `Cast` of the
  element values to the storage type feeding `DequantizeLinear`; `backends.onnx.passes`
  stores the cast initializer in that type.

Differences from `qcompile.core.numerics`, only for non-finite inputs: NaN quantized to an integer
type is undefined in ONNX (numerics keeps NaN); a dynamic tensor or block holding no finite
non-zero value but an inf dequantizes to the saturated value instead of 0. Everything here
knows the ONNX side only; the arithmetic it mirrors lives in `qcompile.core.numerics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import values

from qcompile.backends.onnx import trt_ops as trt
from qcompile.backends.onnx import weights  # noqa: F401  (registers qcompile_onnx::dequantize_weight)
from qcompile.core.formats import (
    E2M1,
    E4M3,
    E4M3_MAX,
    INT4,
    INT8,
    ElementType,
    QuantFormat,
    ScaleKind,
    ScaleRule,
    get_format,
)

TARGETS = ("tensorrt", "onnx")
#: The lowest opset torch.onnx's dynamo exporter writes.
EXPORTER_MIN_OPSET = 18
STORAGE_TYPES: dict[ElementType, ir.DataType] = {
    INT8: ir.DataType.INT8,
    INT4: ir.DataType.INT4,
    E4M3: ir.DataType.FLOAT8E4M3FN,
    E2M1: ir.DataType.FLOAT4E2M1,
}
_FLT_MIN = float(np.finfo(np.float32).tiny)
_LN2 = math.log(2.0)


def required_opset(fmt: QuantFormat, block_size: int | None) -> tuple[int, str]:
    """The lowest opset that can express `fmt` (with blocks or not), and why."""
    if fmt.element is E2M1:
        return 23, "FLOAT4E2M1 needs opset 23"
    if block_size is not None or fmt.element is INT4:
        return 21, "INT4 and block_size in QuantizeLinear/DequantizeLinear need opset 21"
    if fmt.element is E4M3:
        return 19, "FLOAT8E4M3FN needs opset 19"
    return EXPORTER_MIN_OPSET, f"torch.onnx's dynamo exporter writes opset >= {EXPORTER_MIN_OPSET}"


def preferred_opset(fmt: QuantFormat, block_size: int | None) -> int:
    """The opset export picks for `fmt` when none is asked for: `required_opset`, raised to 21
    for FP8, whose QuantizeLinear then has no zero point (`output_dtype` instead): onnxruntime
    (<= 1.32 at least) drops a Relu in front of an FP8 QuantizeLinear that has a zero point
    (rule `ReluQuantRewrite`, `backends.onnx.rules.ORT_RULES["relu-dropped"]`)."""
    needed, _ = required_opset(fmt, block_size)
    return max(needed, 21) if fmt.element is E4M3 else needed


def check_supported(fmt: QuantFormat, dynamic: bool, weight: bool, target: str) -> None:
    """Refuse, with what to do instead, the quantizations `target` cannot express."""
    if target == "onnx":
        return
    what = f"{fmt.name} {'weights' if weight else 'activations'}"
    if fmt.scale is ScaleKind.E8M0 and fmt.element is E2M1:
        raise ValueError(f"TensorRT has no MXFP4 ops; export {what} with target='onnx' or use nvfp4")
    if weight:
        return
    if fmt.scale_rule is ScaleRule.OCP:
        raise ValueError(
            f"TensorRT's TRT_MXFP8DynamicQuantize computes its block scales by the ceil rule, not "
            f"the OCP rule of {what}; use mxfp8 (ceil) or export with target='onnx'"
        )
    if fmt.element is INT4:
        raise ValueError(f"TensorRT quantizes INT4 weights only (W4A16); {what} need target='onnx'")
    if fmt.scale is ScaleKind.FP32 and dynamic:
        raise ValueError(
            f"TensorRT's explicit quantization needs static scales for {what}; calibrate the "
            "quantizer (static amax) or export with target='onnx'"
        )
    if fmt.scale is ScaleKind.E4M3_TWO_LEVEL and dynamic:
        raise ValueError(
            f"TensorRT's TRT_FP4DynamicQuantize needs a static global scale for {what}; "
            "calibrate the quantizer's global amax or export with target='onnx'"
        )


class _Builder:
    """Emits the nodes of one translation for one target and opset."""

    def __init__(self, target: str, opset: int) -> None:
        self.target = target
        self.opset = opset
        self.op = values.Opset("", opset)

    def const(self, value: float | list[int], dtype=np.float32) -> ir.Value:
        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    # -- scales -------------------------------------------------------------------------------

    def finite_abs(self, x: ir.Value) -> ir.Value:
        """|x| with inf and NaN replaced by 0 (`numerics.finite_abs`)."""
        magnitude = self.op.Abs(x)
        return self.op.Where(self.op.Less(magnitude, self.const(math.inf)), magnitude, self.const(0.0))

    def block_amax(self, x: ir.Value, block_size: int) -> ir.Value:
        """Finite absolute max of each block of the last axis: shape x.shape[:-1] + (K/bs,)."""
        rank, k = len(x.shape), x.shape[-1]
        if not isinstance(k, int):
            raise ValueError("block quantization needs a static last axis")
        blocks = self.op.Reshape(x, self.const([0] * (rank - 1) + [k // block_size, block_size], np.int64))
        return self.op.ReduceMax(self.finite_abs(blocks), self.const([-1], np.int64), keepdims=0)

    def tensor_amax(self, x: ir.Value) -> ir.Value:
        return self.op.ReduceMax(self.finite_abs(x), keepdims=0)

    def floor_log2(self, v: ir.Value) -> ir.Value:
        """floor(log2(v)) as float, exact: Log estimate corrected by one step either way."""
        op = self.op
        estimate = op.Floor(op.Div(op.Log(v), self.const(_LN2)))
        power = op.Pow(self.const(2.0), estimate)
        too_high = op.Cast(op.Greater(power, v), to=ir.DataType.FLOAT)
        too_low = op.Cast(op.LessOrEqual(op.Mul(power, self.const(2.0)), v), to=ir.DataType.FLOAT)
        return op.Add(op.Sub(estimate, too_high), too_low)

    def static_scale(self, amax: ir.Value, divisor: float) -> ir.Value:
        """max(amax / divisor, FLT_MIN): positive, constant-folded for an initializer amax."""
        return self.op.Max(self.op.Div(amax, self.const(divisor)), self.const(_FLT_MIN))

    # -- Q/DQ ---------------------------------------------------------------------------------

    def qdq(self, x: ir.Value, q_scale: ir.Value, dq_scale: ir.Value, element: ElementType,
            axis: int, block_size: int) -> ir.Value:
        """DequantizeLinear(QuantizeLinear(x, q_scale), dq_scale) into the element's type."""
        storage = STORAGE_TYPES[element]
        blocks = {"block_size": block_size} if block_size else {}
        if self.opset >= 21:
            q = self.op.QuantizeLinear(x, q_scale, axis=axis, output_dtype=storage, **blocks)
            return self.op.DequantizeLinear(q, dq_scale, axis=axis, **blocks)
        # Below opset 21 the zero point gives the Q its type; the DQ gets it too: onnxruntime's
        # QDQPropagationTransformer copies a DQ's inputs into a new Q across a Transpose, and
        # without a zero point that Q would be UINT8 (clamping negatives to 0).
        zero = self.op.Cast(self.op.Mul(q_scale, self.const(0.0)), to=storage)
        q = self.op.QuantizeLinear(x, q_scale, zero, axis=axis)
        return self.op.DequantizeLinear(q, dq_scale, zero, axis=axis)

    def guarded(self, scale: ir.Value) -> ir.Value:
        """The divisor of `numerics.quantize`: the scale where positive, else 1."""
        return self.op.Where(self.op.Greater(scale, self.const(0.0)), scale, self.const(1.0))

    # -- activations --------------------------------------------------------------------------

    def fake_quantize(self, x: ir.Value, amax: ir.Value | None, fmt: QuantFormat,
                      block_size: int | None) -> ir.Value:
        check_supported(fmt, amax is None, weight=False, target=self.target)
        dtype = x.dtype
        if dtype != ir.DataType.FLOAT:
            x = self.op.Cast(x, to=ir.DataType.FLOAT)
        if fmt.scale is ScaleKind.FP32:
            y = self._fp32_scaled(x, amax, fmt, block_size)
        elif fmt.scale is ScaleKind.E4M3_TWO_LEVEL:
            y = self._two_level(x, amax, fmt, block_size)
        else:
            y = self._e8m0(x, fmt, block_size)
        return y if dtype == ir.DataType.FLOAT else self.op.Cast(y, to=dtype)

    def _fp32_scaled(self, x, amax, fmt, block_size):
        element, last = fmt.element, len(x.shape) - 1
        if amax is None:
            scale = (self.block_amax(x, block_size) if block_size else self.tensor_amax(x))
            scale = self.op.Div(scale, self.const(fmt.divisor))
            return self.qdq(x, self.guarded(scale), scale, element, last, block_size or 0)
        scale = self.static_scale(amax, fmt.divisor)
        shape = list(amax.shape)
        if math.prod(shape) == 1:  # per tensor (also a single amax for a block format)
            scale = self.op.Reshape(scale, self.const([], np.int64))
            return self.qdq(x, scale, scale, element, 0, 0)
        if block_size:  # one amax per block: (..., K/bs, 1)
            scale = self.op.Squeeze(scale, self.const([-1], np.int64))
            return self.qdq(x, scale, scale, element, last, block_size)
        channel_axes = [d for d, n in enumerate(shape) if n != 1]
        if len(channel_axes) != 1:
            raise ValueError(f"amax of shape {shape} is neither per tensor nor per channel")
        axis = channel_axes[0] + len(x.shape) - len(shape)
        scale = self.op.Reshape(scale, self.const([-1], np.int64))
        return self.qdq(x, scale, scale, element, axis, 0)

    def _two_level(self, x, amax, fmt, block_size):
        op, last = self.op, len(x.shape) - 1
        gs_divisor = fmt.element.max_value * E4M3_MAX
        if self.target == "tensorrt":
            global_scale = op.Reshape(self.static_scale(amax, gs_divisor), self.const([], np.int64))
            data, block_scale = trt.FP4_DYNAMIC_QUANTIZE(
                x, global_scale, axis=-1, block_size=block_size,
                scale_type=ir.DataType.FLOAT8E4M3FN, _outputs=2,
            )
            data.dtype, block_scale.dtype = ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E4M3FN
            scale = op.DequantizeLinear(block_scale, global_scale)
            return op.DequantizeLinear(data, scale, axis=-1, block_size=block_size)
        if amax is None:
            global_scale = op.Div(self.tensor_amax(x), self.const(gs_divisor))
        else:
            global_scale = op.Reshape(self.static_scale(amax, gs_divisor), self.const([], np.int64))
        raw = op.Div(op.Div(self.block_amax(x, block_size), self.const(fmt.element.max_value)),
                     global_scale)
        raw = op.Where(op.Greater(global_scale, self.const(0.0)), raw, self.const(0.0))
        block_scale = op.Cast(op.Min(raw, self.const(E4M3_MAX)), to=ir.DataType.FLOAT8E4M3FN)
        scale = op.DequantizeLinear(block_scale, global_scale)
        return self.qdq(x, self.guarded(scale), scale, fmt.element, last, block_size)

    def _e8m0(self, x, fmt, block_size):
        last = len(x.shape) - 1
        if self.target == "tensorrt":  # MXFP8 (check_supported refused MXFP4)
            data, scale = trt.MXFP8_DYNAMIC_QUANTIZE(
                x, axis=-1, block_size=block_size, output_dtype=ir.DataType.FLOAT8E4M3FN, _outputs=2
            )
            data.dtype, scale.dtype = ir.DataType.FLOAT8E4M3FN, ir.DataType.UINT8
            return trt.MXFP8_DEQUANTIZE_LINEAR(
                data, scale, axis=-1, block_size=block_size, output_dtype=ir.DataType.FLOAT
            )
        scale = self.e8m0_scale(self.block_amax(x, block_size), fmt)
        return self.qdq(x, scale, scale, fmt.element, last, block_size)

    def e8m0_scale(self, amax: ir.Value, fmt: QuantFormat) -> ir.Value:
        """`2 ** numerics.e8m0_exponent(amax)`, step by step in standard ops."""
        op = self.op
        low, high = self.const(-127.0), self.const(127.0)
        if fmt.scale_rule is ScaleRule.OCP:
            exponent = op.Sub(self.floor_log2(amax), self.const(float(fmt.element.max_exponent)))
        else:  # CEIL: floor(log2(q)) + 1 where q = amax / max is not a power of two
            q = op.Div(amax, self.const(fmt.element.max_value))
            exponent = op.Clip(self.floor_log2(q), low, high)
            inexact = op.Greater(q, op.Pow(self.const(2.0), exponent))
            exponent = op.Add(exponent, op.Cast(inexact, to=ir.DataType.FLOAT))
        return op.Pow(self.const(2.0), op.Clip(exponent, low, high))

    # -- weights ------------------------------------------------------------------------------

    def dequantize_weight(self, values_: ir.Value, scale: ir.Value, global_scale: ir.Value | None,
                          fmt: QuantFormat, block_size: int, axis: int) -> ir.Value:
        check_supported(fmt, dynamic=False, weight=True, target=self.target)
        op = self.op
        data = op.Cast(values_, to=STORAGE_TYPES[fmt.element])
        if block_size and scale.dtype == ir.DataType.UINT8:  # TensorRT MXFP8: E8M0 exponents
            return trt.MXFP8_DEQUANTIZE_LINEAR(
                data, scale, axis=-1, block_size=block_size, output_dtype=ir.DataType.FLOAT
            )
        if global_scale is not None:
            block_scale = op.Cast(scale, to=ir.DataType.FLOAT8E4M3FN)
            scale = op.DequantizeLinear(block_scale, global_scale)
        blocks = {"block_size": block_size} if block_size else {}
        return op.DequantizeLinear(data, scale, axis=axis, **blocks)


def translation_table(target: str, opset: int) -> dict[Callable, Callable]:
    """`custom_translation_table` entries for `torch.onnx.export` for this target and opset."""
    builder = _Builder(target, opset)

    def fake_quantize(x, amax, format: str, block_size: int):
        fmt = get_format(format)
        block = block_size or None
        needed, why = required_opset(fmt, block)
        if opset < needed:
            raise ValueError(f"{fmt.name} cannot be exported at opset {opset}: {why}")
        return builder.fake_quantize(x, amax, fmt, block)

    def dequantize_weight(values_, scale, global_scale, format: str, block_size: int, axis: int):
        return builder.dequantize_weight(values_, scale, global_scale, get_format(format),
                                         block_size, axis)

    return {
        torch.ops.qcompile.fake_quantize.default: fake_quantize,
        torch.ops.qcompile_onnx.dequantize_weight.default: dequantize_weight,
    }
