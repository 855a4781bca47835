"""Independent references for the numerics contract (README's numerics table), built without qcompile's code.

Two references, each written from the contract and not from `qcompile.core.numerics`:

- `ml_dtypes_fake_quantize`: numpy float32 arithmetic for the scales, and the casts of
  `ml_dtypes` (`int4`, `float8_e4m3fn`, `float4_e2m1fn`, `float8_e8m0fnu`; all round half to
  even) for the element values. Saturation is done by clipping before each cast, because the
  casts themselves wrap (int4), overflow to NaN (e4m3fn) or map NaN to zero (e2m1).
- `onnx_fake_quantize`: tiny `QuantizeLinear -> DequantizeLinear` models run by
  `onnx.reference.ReferenceEvaluator`, with scales precomputed by `reference_scales`
  (opset 19 for int8 and FLOAT8E4M3FN, 21 for INT4 with `block_size`, 23 for FLOAT4E2M1).
  `onnx_nvfp4_two_level` dequantizes the FLOAT8E4M3FN block scales by the fp32 global scale
  inside the model, the form exported to TensorRT.

E8M0 (MX) scales follow one of two rules, each written here from its definition: "ceil"
(default `mxfp4`/`mxfp8`: the smallest power of two 2**k >= fp32(amax / max), what NVIDIA's
runtimes compute) and "ocp" (`*_ocp`: 2**(floor(log2(amax)) - emax), the OCP MX text).

Dynamic amax ignores inf and NaN (as `qcompile.core.numerics.finite_abs` documents). The format
table below is written out again on purpose rather than read from `qcompile.core.formats`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator


@dataclass(frozen=True)
class RefFormat:
    name: str
    element: str  # "int8", "int4", "e4m3", "e2m1"
    qmin: float
    qmax: float
    scale: str  # "fp32", "nvfp4", "e8m0"
    block_size: int | None
    emax: int = 0  # exponent of the largest power of two of the element (E8M0 scales)
    rule: str = ""  # E8M0 scales: "ceil" or "ocp"
    divisor: float = 0.0  # fp32 scales: amax / divisor (0: qmax)


REF_FORMATS = {
    f.name: f
    for f in (
        RefFormat("int8", "int8", -128.0, 127.0, "fp32", None),
        # amax / 7.5 (torchao, compressed-tensors: amax / ((qmax - qmin) / 2)).
        RefFormat("int4", "int4", -8.0, 7.0, "fp32", 128, divisor=(7.0 - -8.0) / 2),
        RefFormat("fp8", "e4m3", -448.0, 448.0, "fp32", None),
        RefFormat("nvfp4", "e2m1", -6.0, 6.0, "nvfp4", 16),
        RefFormat("mxfp4", "e2m1", -6.0, 6.0, "e8m0", 32, emax=2, rule="ceil"),
        RefFormat("mxfp8", "e4m3", -448.0, 448.0, "e8m0", 32, emax=8, rule="ceil"),
        RefFormat("mxfp4_ocp", "e2m1", -6.0, 6.0, "e8m0", 32, emax=2, rule="ocp"),
        RefFormat("mxfp8_ocp", "e4m3", -448.0, 448.0, "e8m0", 32, emax=8, rule="ocp"),
    )
}

F32 = np.float32


def finite_abs(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), np.abs(x), F32(0)).astype(F32)


def blocks(x: np.ndarray, block_size: int | None) -> np.ndarray:
    if block_size is None:
        return x
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def unblocks(x: np.ndarray, block_size: int | None) -> np.ndarray:
    return x if block_size is None else x.reshape(*x.shape[:-2], -1)


@dataclass
class RefScales:
    """Scales broadcastable to the block view of x (`scale`), plus NVFP4's two levels."""

    scale: np.ndarray
    block_scale_e4m3: np.ndarray | None = None  # ml_dtypes.float8_e4m3fn, block view
    global_scale: np.ndarray | None = None  # fp32 0-d


def e8m0_scale(block_amax: np.ndarray, fmt: RefFormat) -> np.ndarray:
    """The E8M0 scale 2**e, e clamped to [-127, 127], of each (finite, >= 0) block amax.

    ocp: e = floor(log2(amax)) - emax. ceil: the smallest e with 2**e >= q, where
    q = amax / max divided in float32 (round to nearest). amax 0 -> 2**-127 under both.
    """
    if fmt.rule == "ocp":
        mantissa, exponent = np.frexp(block_amax.astype(np.float64))  # amax = m * 2**e, m in [.5, 1)
        floor_log2 = np.where(block_amax > 0, exponent - 1, -127)
        e = np.clip(floor_log2 - fmt.emax, -127, 127)
    elif fmt.rule == "ceil":
        q = (block_amax.astype(F32) / F32(fmt.qmax)).astype(np.float64)  # exact from here on
        mantissa, exponent = np.frexp(q)  # q = m * 2**x, m in [.5, 1): 2**x >= q > 2**(x - 1)
        ceil_log2 = np.where(mantissa == 0.5, exponent - 1, exponent)
        e = np.clip(np.where(q > 0, ceil_log2, -127), -127, 127)
    else:
        raise AssertionError(fmt.rule)
    scale = np.ldexp(np.float64(1), e).astype(F32)  # exact: 2**-127 is an fp32 subnormal
    # E8M0 holds every one of these exactly; casting through it must not change anything.
    assert np.array_equal(scale.astype(ml_dtypes.float8_e8m0fnu).astype(F32), scale)
    return scale


def e8m0_edge_amaxes(element_max: float) -> np.ndarray:
    """Block amaxes at the edges of both E8M0 rules: exactly max * 2**k, one ulp either side,
    significands just over and under the element max's, powers of two, zero, fp32 subnormals
    (quotients around 2**-127) and the largest finite values."""
    m = F32(element_max)
    at = np.ldexp(m, np.arange(-140, 126, 7)).astype(F32)
    edges = np.concatenate([at, np.nextafter(at, F32(np.inf)), np.nextafter(at, F32(0))])
    powers = np.ldexp(F32(1), np.arange(-149, 128, 11)).astype(F32)
    special = np.array([0.0, 1.4e-45, 1e-40, 2.0**-127 * element_max, 2.6331075e-36, 3.5264833e-38,
                        3e38, np.finfo(F32).max, 1.0, 0.75, 1.9999999], F32)
    return np.concatenate([edges, powers, special]).astype(F32)


def e8m0_edge_blocks(element_max: float) -> np.ndarray:
    """One 32-element block per `e8m0_edge_amaxes` value: the amax (negative) and elements
    amax * +-2**-j (j = 1..31, alternating sign), which reach the element type's subnormals,
    where a scale one power of two off changes the rounding."""
    amaxes = e8m0_edge_amaxes(element_max).astype(np.float64)
    j = np.arange(32)
    spread = np.where(j % 2, -1.0, 1.0) * np.ldexp(1.0, -j)
    x = (amaxes[:, None] * spread[None, :]).astype(F32)
    x[:, 0] = -amaxes.astype(F32)
    return x



def reference_scales(
    x: np.ndarray,
    fmt: RefFormat,
    amax: np.ndarray | float | None = None,
    axis: int | None = None,
    block_size: int | None = None,
    block_amax: np.ndarray | None = None,
) -> RefScales:
    """The scales of DESIGN.md's table for float32 x, in float32 numpy. `block_amax` (nvfp4,
    e8m0; one per block): stored weight scales' amax, used instead of each block's max."""
    x = np.asarray(x, F32)
    bs = block_size if block_size is not None else fmt.block_size
    xb = blocks(x, bs)
    if fmt.scale == "fp32":
        if amax is not None:
            a = np.asarray(amax, F32)
            if axis is not None:
                shape = [1] * x.ndim
                shape[axis] = x.shape[axis]
                a = a.reshape(shape)
            elif bs is not None and a.size > 1:
                a = a.reshape(*xb.shape[:-1], 1)
            else:
                a = a.reshape(())
        elif bs is not None:
            a = finite_abs(xb).max(axis=-1, keepdims=True)
        elif axis is not None:
            dims = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
            a = finite_abs(x).max(axis=dims, keepdims=True) if dims else finite_abs(x)
        else:
            a = finite_abs(x).max()
        return RefScales((a / F32(fmt.divisor or fmt.qmax)).astype(F32))
    if block_amax is None:
        block_amax = finite_abs(xb).max(axis=-1, keepdims=True)
    else:
        block_amax = np.asarray(block_amax, F32).reshape(*xb.shape[:-1], 1)
    if fmt.scale == "nvfp4":
        a = finite_abs(x).max() if amax is None else np.asarray(amax, F32).reshape(())
        gs = F32(a / F32(6 * 448))
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = (block_amax / F32(6)) / gs
        raw = np.where(gs > 0, raw, F32(0)).astype(F32)
        block_scale = np.minimum(raw, F32(448)).astype(ml_dtypes.float8_e4m3fn)
        scale = (block_scale.astype(F32) * gs).astype(F32)
        return RefScales(scale, block_scale, np.asarray(gs, F32))
    if fmt.scale == "e8m0":
        return RefScales(e8m0_scale(block_amax, fmt))
    raise AssertionError(fmt.scale)


def cast_to_element(v: np.ndarray, fmt: RefFormat) -> np.ndarray:
    """Saturate (clip) then cast to the element type with ml_dtypes; returned as float32.

    NaN stays NaN (the cast of the integer and E2M1 types would lose it).
    """
    nan = np.isnan(v)
    v = np.clip(v, F32(fmt.qmin), F32(fmt.qmax))
    if fmt.element == "int8":
        q = np.rint(np.where(nan, 0, v)).astype(np.int8).astype(F32)
    elif fmt.element == "int4":
        q = np.rint(np.where(nan, 0, v)).astype(ml_dtypes.int4).astype(F32)
    elif fmt.element == "e4m3":
        q = v.astype(ml_dtypes.float8_e4m3fn).astype(F32)
    elif fmt.element == "e2m1":
        q = v.astype(ml_dtypes.float4_e2m1fn).astype(F32)
    else:
        raise AssertionError(fmt.element)
    return np.where(nan, F32(np.nan), q).astype(F32)


def ml_dtypes_fake_quantize(
    x: np.ndarray,
    fmt: RefFormat | str,
    amax: np.ndarray | float | None = None,
    axis: int | None = None,
    block_size: int | None = None,
    block_amax: np.ndarray | None = None,
) -> np.ndarray:
    """fake_quantize per the contract: y = cast(clip(x / scale)) * scale; zero scale -> zeros."""
    fmt = REF_FORMATS[fmt] if isinstance(fmt, str) else fmt
    x = np.asarray(x, F32)
    bs = block_size if block_size is not None else fmt.block_size
    scale = reference_scales(x, fmt, amax, axis, block_size, block_amax).scale
    xb = blocks(x, bs)
    divisor = np.where(scale > 0, scale, F32(1)).astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        q = cast_to_element((xb / divisor).astype(F32), fmt)
        y = (q * scale).astype(F32)
    return unblocks(y, bs)


# ------------------------------------------------------------------------------- onnx
_ONNX_ELEMENT = {
    "int8": (TensorProto.INT8, 19),
    "int4": (TensorProto.INT4, 21),
    "e4m3": (TensorProto.FLOAT8E4M3FN, 19),
    "e2m1": (TensorProto.FLOAT4E2M1, 23),
}


def _zero_point(element: str) -> onnx.TensorProto | None:
    """A zero zero-point naming the output type (opsets before `output_dtype`)."""
    if element == "int8":
        return helper.make_tensor("zero_point", TensorProto.INT8, [], [0])
    if element == "int4":
        return helper.make_tensor("zero_point", TensorProto.INT4, [], [0])
    if element == "e4m3":
        return helper.make_tensor("zero_point", TensorProto.FLOAT8E4M3FN, [], [0])
    return None  # FLOAT4E2M1: output_dtype attribute (opset 23)


@functools.lru_cache(maxsize=None)
def _qdq_session(element: str, axis: int | None, block_size: int | None) -> ReferenceEvaluator:
    qtype, opset = _ONNX_ELEMENT[element]
    if block_size is not None:
        opset = max(opset, 21)  # block_size arrived in opset 21
    attrs: dict = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
        attrs["axis"] = -1
    zero_point = _zero_point(element)
    q_inputs = ["x", "scale"] + (["zero_point"] if zero_point is not None else [])
    q_attrs = dict(attrs)
    if element == "e4m3":
        q_attrs["saturate"] = 1
    if zero_point is None:
        q_attrs["output_dtype"] = qtype
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["q"], **q_attrs),
        helper.make_node("DequantizeLinear", ["q", "scale"] + q_inputs[2:], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[zero_point] if zero_point is not None else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model)


def onnx_scale(scale: np.ndarray, x_shape: tuple[int, ...], axis, block_size) -> np.ndarray:
    """The scale tensor ONNX takes: 0-d, 1-D along `axis`, or blocks on the last axis."""
    if block_size is not None:
        blocks_shape = (*x_shape[:-1], x_shape[-1] // block_size, 1)
        scale = np.broadcast_to(scale, blocks_shape)
        return np.ascontiguousarray(scale.reshape(*x_shape[:-1], x_shape[-1] // block_size))
    if axis is not None:
        return np.ascontiguousarray(scale.reshape(-1))
    return np.asarray(scale, F32).reshape(())


def onnx_fake_quantize(
    x: np.ndarray,
    fmt: RefFormat | str,
    scale: np.ndarray,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear of float32 x with precomputed fp32 scales.

    `scale` is in the layout of `RefScales.scale` (broadcastable to the block view).
    """
    fmt = REF_FORMATS[fmt] if isinstance(fmt, str) else fmt
    bs = block_size if block_size is not None else fmt.block_size
    x = np.ascontiguousarray(x, F32)
    session = _qdq_session(fmt.element, axis if bs is None else None, bs)
    with np.errstate(divide="ignore", invalid="ignore"):  # ONNX divides by zero scales
        (y,) = session.run(None, {"x": x, "scale": onnx_scale(scale, x.shape, axis, bs)})
    return y


@functools.lru_cache(maxsize=None)
def _nvfp4_two_level_session(block_size: int) -> ReferenceEvaluator:
    nodes = [
        # fp8 block scales dequantized by the fp32 global scale: the effective block scale.
        helper.make_node("DequantizeLinear", ["block_scale", "global_scale"], ["scale"]),
        helper.make_node(
            "QuantizeLinear", ["x", "scale"], ["q"], axis=-1, block_size=block_size,
            output_dtype=TensorProto.FLOAT4E2M1,
        ),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["y"], axis=-1, block_size=block_size),
    ]
    graph = helper.make_graph(
        nodes,
        "nvfp4_two_level",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("block_scale", TensorProto.FLOAT8E4M3FN, None),
            helper.make_tensor_value_info("global_scale", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return ReferenceEvaluator(model)


def onnx_nvfp4_two_level(x: np.ndarray, scales: RefScales, block_size: int = 16) -> np.ndarray:
    """NVFP4 as exported to TensorRT: DQ(fp8 block scales, fp32 global) -> Q/DQ FLOAT4E2M1."""
    x = np.ascontiguousarray(x, F32)
    block_scale = np.ascontiguousarray(
        scales.block_scale_e4m3.reshape(*x.shape[:-1], x.shape[-1] // block_size)
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # ONNX divides by zero scales
        (y,) = _nvfp4_two_level_session(block_size).run(
            None, {"x": x, "block_scale": block_scale, "global_scale": scales.global_scale}
        )
    return y
