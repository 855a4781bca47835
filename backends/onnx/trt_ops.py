"""TensorRT's custom ONNX ops (domain `trt`) for dynamic block quantization.

This module owns the signatures of the `trt`-domain ops that TensorRT's ONNX parser imports
for dynamic (run-time) block quantization, as onnxscript ops usable in a translation. The
schemas are local to onnxscript tracing; nothing is registered with onnx globally.

Source: NVIDIA Model Optimizer, `modelopt/torch/quantization/export_onnx.py`
(`_fp4_dynamic_quantize`, `_fp4_dequantize`, `_fp4_dequantize_2`, `_mxfp8_dynamic_quantize`,
`_mxfp8_dequantize`), and its dynamo-export tests, which expect exactly these node sets:

- NVFP4 activations: `trt::TRT_FP4DynamicQuantize(x, global_scale)` with attributes
  `axis=-1`, `block_size=16`, `scale_type=17` (FLOAT8E4M3FN) and two outputs, the FP4 data and
  the E4M3 block scales; then a standard `DequantizeLinear(block_scales, global_scale)` and a
  standard `DequantizeLinear(data, that, axis=-1, block_size=16)`. TensorRT maps it to
  `IDynamicQuantizeLayer` (onnx-tensorrt `TRT_FP4DynamicQuantize` importer).
- MXFP8 activations: `trt::TRT_MXFP8DynamicQuantize(x)` with `axis=-1`, `block_size=32`,
  `output_dtype=17` and two outputs, the FP8 data and uint8 E8M0 scales; then
  `trt::TRT_MXFP8DequantizeLinear(data, scales)` with `axis=-1`, `block_size=32` and
  `output_dtype` the float type of the result. MXFP8 weights use the same dequantize op on an
  FP8 initializer and a uint8 E8M0 initializer.

TensorRT has no MXFP4 op; MXFP4 exports only to `target="onnx"`.
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import values

TRT_DOMAIN = "trt"
_TRT = values.Opset(TRT_DOMAIN, 1)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _attributes(*names: str) -> list[OpSchema.Attribute]:
    return [OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in names]


def _op(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
        attributes: list[str]) -> values.Op:
    schema = OpSchema(
        name, TRT_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[("T", _FLOATS, "float input or output")],
        attributes=_attributes(*attributes),
    )
    return values.Op(_TRT, name, schema)


FP4_DYNAMIC_QUANTIZE = _op(
    "TRT_FP4DynamicQuantize",
    inputs=[("x", "T"), ("global_scale", "tensor(float)")],
    outputs=[("y", "tensor(float4e2m1)"), ("block_scale", "tensor(float8e4m3fn)")],
    attributes=["axis", "block_size", "scale_type"],
)
MXFP8_DYNAMIC_QUANTIZE = _op(
    "TRT_MXFP8DynamicQuantize",
    inputs=[("x", "T")],
    outputs=[("y", "tensor(float8e4m3fn)"), ("scale", "tensor(uint8)")],
    attributes=["axis", "block_size", "output_dtype"],
)
MXFP8_DEQUANTIZE_LINEAR = _op(
    "TRT_MXFP8DequantizeLinear",
    inputs=[("x", "tensor(float8e4m3fn)"), ("scale", "tensor(uint8)")],
    outputs=[("y", "T")],
    attributes=["axis", "block_size", "output_dtype"],
)

#: Ops that dequantize a weight or activation (standard and TensorRT's).
DEQUANTIZE_OPS = frozenset({("", "DequantizeLinear"), (TRT_DOMAIN, "TRT_MXFP8DequantizeLinear")})
#: Ops that quantize an activation.
QUANTIZE_OPS = frozenset({
    ("", "QuantizeLinear"),
    (TRT_DOMAIN, "TRT_FP4DynamicQuantize"),
    (TRT_DOMAIN, "TRT_MXFP8DynamicQuantize"),
})
